"""The linear-probe recipe (train.method=linear-probe): a classification head trained by DP-SGD on
frozen features of the base model, computed once per record and cached where the records live.

    model.py     the frozen encoder's layer-mean features and the head (what travels)
    features.py  the per-record feature cache (never sent)
    centring.py  the client's feature mean (a Gaussian-mechanism release under DP) and the
                 head's change of coordinates, so the mean itself never leaves the client
    training.py  DP-SGD on the head through the package's gradient engine
"""

from fed_dp_lora.probe.model import LinearProbe, build_probe

__all__ = ["LinearProbe", "build_probe"]
