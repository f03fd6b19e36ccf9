"""Reference reproduction of He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition"."""

__version__ = "0.1.0"
