"""Projection heads (fc1..fc3 of Tables 5 and 6): encoder features -> embeddings."""
from torch import nn
import torch


class ProjectionHead(nn.Module):
    """MLP head: (B, in_dim) -> (B, out_dim), raw (not normalised; `AVModel` normalises).

    num_layers=3 (the tables' 512-512-128): fc1 Linear(in_dim, hidden) -> ReLU -> fc2
    Linear(hidden, hidden) -> ReLU -> fc3 Linear(hidden, out_dim). In general fc1..fc{num_layers}
    with ReLU between them; num_layers=1 is a single linear projection fc1 (in_dim -> out_dim), as
    in the reference's analysis configs. Linear layers keep PyTorch's default init (as the
    reference) and have biases. ``input_norm`` (not in the paper) first standardises the input with
    a ``BatchNorm1d`` (``in_bn``): the pooled ReLU features share a large positive mean, which makes
    every clip's embedding nearly the same at initialisation; this removes that mean (the ReLU
    layers still add a smaller shared part).
    """

    def __init__(self, in_dim: int = 512, hidden: int = 512, out_dim: int = 128, num_layers: int = 3,
                 input_norm: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.in_dim, self.out_dim, self.num_layers = in_dim, out_dim, num_layers
        self.in_bn = nn.BatchNorm1d(in_dim) if input_norm else None
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        for i in range(num_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"head input must be (B, {self.in_dim}), got {tuple(x.shape)}")
        if self.in_bn is not None:
            x = self.in_bn(x)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = torch.relu(x)
        return x
