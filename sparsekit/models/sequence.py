"""Character-level language models: ``char-gru`` (the RigL paper's, appendix I), ``char-lstm`` and a
small causal ``char-transformer``.

Shared contract (see ``sparsekit.data.text``): the input is (N, T) float32 symbol codes, cast to int64
ids in the first op (clamped into the vocabulary, so arbitrary float inputs — e.g. benchmark noise —
still run); the output is (N, T, vocab) next-symbol logits. No dropout, so resume stays bit-exact.
What is prunable (``sparsekit.masks.prunable_weights``): the GRU/LSTM ``weight_ih_l*``/``weight_hh_l*``
stacked gate matrices, the attention ``in_proj_weight`` and every Linear (readout, attention
out-projection, feed-forward, vocabulary head). Embeddings and LayerNorms stay dense.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.models.nets import scaled


class _CharModel(nn.Module):
    #: FLOP counting reads this: the per-sample input is a sequence, so counts are also given per token.
    sequence_model = True

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def ids(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.long).clamp(0, self.vocab - 1)


class CharRNN(_CharModel):
    """embedding → GRU/LSTM → readout Linear+ReLU layers → Linear to the vocabulary.

    The paper's char-level GRU: embedding 128, GRU 512, readout 256 → 128, vocabulary 256.
    """

    def __init__(self, vocab: int, *, cell: str = "gru", embed: int = 128, hidden: int = 512,
                 readout: tuple[int, ...] = (256, 128), layers: int = 1) -> None:
        super().__init__(vocab)
        self.embed = nn.Embedding(vocab, embed)
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn_cls(embed, hidden, num_layers=layers, batch_first=True)
        blocks: list[nn.Module] = []
        prev = hidden
        for i, width in enumerate(readout, start=1):
            lin = nn.Linear(prev, width)
            self.add_module(f"fc{i}", lin)
            blocks.append(lin)
            prev = width
        self._readout = blocks
        self.head = nn.Linear(prev, vocab)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._readout_logits(self.rnn(self.embed(self.ids(x)))[0])

    def step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """One generation step with the state in and out: x (N, 1) symbol codes, h (and, for an LSTM, c) of shape
        (layers, N, hidden) -> (logits (N, 1, vocab), h'[, c']). The fast exporter writes it as a step model."""
        _, state = self.rnn(self.embed(self.ids(x)), h if c is None else (h, c))
        state = state if isinstance(state, tuple) else (state,)
        # the readout on the last layer's new state (N, hidden), the step's output: rows, so its layers chain with
        # no reshapes between (and no transpose of the GRU's (T, 1, N, hidden) output)
        return (self._readout_logits(state[0][-1]).unsqueeze(1), *state)

    def _readout_logits(self, h: torch.Tensor) -> torch.Tensor:
        for lin in self._readout:
            h = self.act(lin(h))
        return self.head(h)


class CharTransformer(_CharModel):
    """Token + learned position embeddings → causal ``nn.TransformerEncoder`` (pre-norm, GELU) →
    LayerNorm → Linear to the vocabulary. ``max_len`` is the training window length."""

    def __init__(self, vocab: int, *, max_len: int, d_model: int = 256, heads: int = 4, layers: int = 4,
                 ff_mult: int = 4) -> None:
        super().__init__(vocab)
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff_mult * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.encoder.layers:  # p = 0 anyway: no Dropout modules at all (registry convention)
            for name in ("dropout", "dropout1", "dropout2"):
                setattr(block, name, nn.Identity())
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("_positions", torch.arange(max_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(self.ids(x)) + self.pos(self._positions[:t])
        causal = torch.triu(torch.full((t, t), float("-inf"), device=x.device), diagonal=1)
        # is_causal=True with the explicit mask: no data-dependent mask check (torch.export needs that)
        h = self.encoder(h, mask=causal, is_causal=True)
        return self.head(self.norm(h))


def build_char_gru(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    return CharRNN(num_classes, cell="gru", embed=scaled(128, width), hidden=scaled(512, width),
                   readout=(scaled(256, width), scaled(128, width)))


def build_char_lstm(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    return CharRNN(num_classes, cell="lstm", embed=scaled(128, width), hidden=scaled(512, width),
                   readout=(scaled(256, width), scaled(128, width)))


CHAR_TRANSFORMER_HEADS = 4


def build_char_transformer(input_shape: tuple[int, ...], num_classes: int, *, width: float) -> nn.Module:
    heads = CHAR_TRANSFORMER_HEADS
    d_model = heads * scaled(64, width)  # 256 at width 1; a multiple of the head count at every width
    return CharTransformer(num_classes, max_len=int(input_shape[0]), d_model=d_model, heads=heads, layers=4)
