"""The `prefix-rft` command: the trainer's commands, the one-machine launcher and a REST client.

The only package that wires everything together; nothing imports it (tests/test_boundaries.py).
"""
