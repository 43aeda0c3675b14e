"""The application built on the library: the ``python -m pykernels`` command line, the
demo and what only it needs (data, side-by-side training, timings, progress bars).

``import pykernels`` does not import this package; nothing in the library may import it.
"""
