"""A stack's run directory and what lives in it: the record `lyra up` writes (`stack_record`), the processes a
stack left behind (`leftovers`), and who holds the ports a stack wants (`ports`). No sockets of the wire here:
the coordinator, the client and the CLI all ask these modules."""
