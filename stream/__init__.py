"""The I/O side of fusionrec: Faust worker, Redis sink, checkpoints, replay and command line."""
