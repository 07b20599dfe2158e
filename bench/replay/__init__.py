"""Trace replay: weightpool's policy against the policies people use today, and an oracle.

A discrete-event simulator (:mod:`bench.replay.simulator`) replays routing traces (:mod:`bench.
replay.trace`) of real model shapes on a hardware model (:mod:`bench.replay.presets`); every
policy (:mod:`bench.replay.policies`) sees the same trace, hardware and information.
"""
