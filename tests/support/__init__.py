"""Code that the tests and the benchmarks share, so neither has to import the other.

* ``frontend``: the vhost-user test front-end (guest memory, rings, FUSE requests).
* ``daemon``: starting and stopping pyvirtiofsd from this checkout for one test.
* ``reference``: QEMU's C virtiofsd, and stopping/awaiting any daemon process.
* ``reference_daemons``: pyvirtiofsd (a committed snapshot or the work tree), Rust and C
  virtiofsd behind one start/stop interface.
* ``vm`` and ``assets``: booting a throwaway QEMU guest, and the kernels and initramfs it
  boots.

The import rule: nothing under ``tests/`` imports ``benchmarks``; ``benchmarks`` imports from
``tests`` only this package; and this package imports neither ``benchmarks`` nor any other
part of ``tests`` (test modules, fixtures, the fuzzer, the conformance suite). Shared code
that one side needs from the other moves here.
"""
