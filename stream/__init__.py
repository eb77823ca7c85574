"""Everything of fusionrec that does I/O: the Faust worker, the Redis sink,
checkpoints, the replay tool and the command line.
"""
