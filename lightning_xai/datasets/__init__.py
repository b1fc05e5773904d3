"""Small, offline benchmark datasets with known shortcuts, built from sklearn's bundled 8x8 digits.

- :class:`ColorDigits` (ColorMNIST analogue): the class colour is reversed between train and test.
- :class:`DecoyDigits` (DecoyMNIST analogue): a corner patch encodes the class in train only, with
  a mask of the patch for explanation penalties such as RRR.
"""

from lightning_xai.datasets.color_digits import ColorDigits, digit_colours
from lightning_xai.datasets.decoy_digits import DecoyDigits, decoy_levels

__all__ = ["ColorDigits", "DecoyDigits", "decoy_levels", "digit_colours"]
