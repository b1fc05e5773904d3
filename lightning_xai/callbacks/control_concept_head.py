"""ControlConceptHead: keeps a concept decodable from a layer while another concept is removed."""

from __future__ import annotations

from lightning_xai.callbacks._concept_head import ConceptHead


class ControlConceptHead(ConceptHead):
    """An ordinary classifier head of a control concept on a named layer (CausaLM's control-concept task).

    Same arguments and mechanics as :class:`~lightning_xai.callbacks.AdversarialConceptHead`, without gradient
    reversal: its loss, weighted by ``weight`` (and the schedule), keeps the concept decodable, so that
    removing the treated concept does not take correlated, legitimate information with it. Logs
    ``concept/<name>/accuracy`` and ``concept/<name>/loss`` per epoch.

    Examples:
        >>> head = ControlConceptHead(layer="encoder.layer.1", concept_key="is_name", num_classes=2, weight=0.5)
        >>> head.term_name, head.weight
        ('is_name_control', 0.5)
    """
