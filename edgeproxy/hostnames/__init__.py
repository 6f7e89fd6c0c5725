"""Customer hostnames as first-class objects: input rules (``entries``) and the in-memory
mirror of the storage registry every process keeps (``registry``)."""
