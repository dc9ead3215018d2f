"""Side-by-side benchmarks of pyvirtiofsd, Rust virtiofsd and C virtiofsd."""
