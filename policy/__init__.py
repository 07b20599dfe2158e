"""The control step: prediction, scoring, veto, scheduling (DESIGN section 2). Imports no Ray.

Not built yet: see issue 3.
"""
