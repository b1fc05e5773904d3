"""Small, offline benchmark datasets: shortcuts built from sklearn's bundled 8x8 digits, and readers of files.

- :class:`ColorDigits` (ColorMNIST analogue): the class colour is reversed between train and test.
- :class:`DecoyDigits` (DecoyMNIST analogue): a corner patch encodes the class in train only, with
  a mask of the patch for explanation penalties such as RRR.
- :class:`AdultIncome`: the UCI Adult table from a CSV you pass, with sex and race codes for fairness.
- :class:`EmotionTemplates`: a generated emotion corpus with gender as treated concept and a
  counterfactual (gender-swapped) twin of every sentence, for concept-effect estimation.
"""

from lightning_xai.datasets.adult import AdultIncome
from lightning_xai.datasets.color_digits import ColorDigits, digit_colours
from lightning_xai.datasets.decoy_digits import DecoyDigits, decoy_levels
from lightning_xai.datasets.emotion_templates import EmotionTemplates

__all__ = ["AdultIncome", "ColorDigits", "DecoyDigits", "EmotionTemplates", "decoy_levels", "digit_colours"]
