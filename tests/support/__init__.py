"""Code that the tests and the benchmarks share, so neither has to import the other.

* ``frontend``: the vhost-user test front-end (guest memory, rings, FUSE requests).
* ``daemon``: starting and stopping pyvirtiofsd from this checkout for one test.
* ``reference``: the reference daemons this Debian release has (C virtiofsd on Debian 12,
  Rust virtiofsd in its place from Debian 13 on, saying so), and stopping/awaiting any
  daemon process.
* ``reference_daemons``: pyvirtiofsd (a committed snapshot or the work tree), Rust and C
  virtiofsd behind one start/stop interface.
* ``vm`` and ``assets``: booting a throwaway QEMU guest, and the kernels and initramfs it
  boots.
* ``systemd`` (``vm``, ``agent``, ``driver``): a VM that boots the host's
  systemd as PID 1 (the shipped units under a real systemd), the command server inside it,
  and what the test front-end does in there.
* ``debian``: the host's Debian release and apt sources; other suites (a kernel, Rust
  virtiofsd) come from the machine's own mirror.
* ``python -m tests.support`` (``__main__``): fetches all of the above before the tests run
  (``.ci/setup`` does).

The import rule: nothing under ``tests/`` imports ``benchmarks``; ``benchmarks`` imports from
``tests`` only this package; and this package imports neither ``benchmarks`` nor any other
part of ``tests`` (test modules, fixtures, the fuzzer, the conformance suite). Shared code
that one side needs from the other moves here.
"""
