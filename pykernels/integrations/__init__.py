"""Integrations with other libraries, each imported only when used (``import pykernels``
imports none of them): ``pykernels.integrations.transformers`` for HuggingFace
transformers models, reached through :func:`pykernels.fuse`."""
