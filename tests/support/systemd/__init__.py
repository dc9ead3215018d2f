"""The systemd test VM: ``vm`` boots the host's systemd as PID 1 and talks to ``agent``
(the command server inside it); ``driver`` is what the test front-end does in there."""
