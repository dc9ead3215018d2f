"""Carrying a serving daemon over to a new program under a connected front-end: the
device state in plain form (``device_state``), the live upgrade (``live_upgrade``) and
the keeper that replaces a killed supervisor (``keeper``); docs/operations.md."""
