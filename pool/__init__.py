"""The block model: blocks, tiers, encodings and codecs, states and transitions, storage.

Pure Python over numpy, pyarrow and torch; never imports Ray or FastAPI.
"""
