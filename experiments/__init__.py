"""Registered experiments: one module each, named as on the command line (exp=NAME).

Installed as ``jaxaccel.experiment_defs``; see jaxaccel/experiments.py for the file format.
"""
