"""Support for the guest live-migration test and benchmark: ``holder`` (the guest program
that holds files, locks and a listing across hops, and its host side) and ``hops`` (moving
one guest between fresh daemons)."""
