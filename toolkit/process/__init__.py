"""What each server process runs: its main function, and the bootstrap they share.

`single` serves HTTP and the model in one process; with `--http-workers N`, `engine` owns the model
and the batcher and starts N `front_end` processes for the HTTP side.
"""
