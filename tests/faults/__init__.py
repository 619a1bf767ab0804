"""Fault-injection suite: kill, corrupt, fill the disk, race, tamper and misconfigure, then check that
the pipeline refuses or recovers without losing or silently changing data. Each test names, in a
comment, the protection it exercises; removing that protection makes the test fail."""
