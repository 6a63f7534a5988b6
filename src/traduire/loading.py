"""The model of a run: built for a config and a tokenizer (the one model builder, for training
and decoding alike), and loaded from a checkpoint for decoding, its weights in the precision
to decode with, int8 quantisation included."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from traduire.checkpoint import check_vocabulary, load_checkpoint
from traduire.config import Config, config_from_dict
from traduire.errors import CheckpointError
from traduire.model import Transformer, TransformerShape
from traduire.tokenizer import Tokenizer


def build_model(config: Config, tokenizer: Tokenizer) -> Transformer:
    """The network the config's model section describes, for the tokenizer's vocabularies."""
    return Transformer(TransformerShape.from_config(
        config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.pad_id))


def load_for_decoding(checkpoint: Path, tokenizer: Tokenizer, tokenizer_dir: Path,
                      device: torch.device, precision: str) -> tuple[Transformer, Config]:
    """The model saved in `checkpoint`, in eval mode on `device`, its weights in `precision`
    (fp32, bf16, or int8: see quantize_int8), and the config it was trained with. A checkpoint
    trained with another vocabulary than `tokenizer`'s is refused."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    check_vocabulary(state, tokenizer, checkpoint, tokenizer_dir)
    config = config_from_dict(state["config"], origin=str(checkpoint))
    model = build_model(config, tokenizer)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(f"{checkpoint}: weights do not fit the model of "
                              f"{tokenizer_dir.parent} (different architecture or vocabulary)"
                              ) from None
    model.eval()
    if precision == "int8":
        model = quantize_int8(model)
    elif precision == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(device), config


def quantize_int8(model: Transformer) -> Transformer:
    """A copy of `model` for decoding on CPU whose linear layers and output projection multiply
    int8 weights by int8 activations (torch's dynamic quantization: weights quantized once,
    per output channel; activations per call). The model's `project` becomes the int8
    projection of the tied embedding matrix. Speed and quality: see docs/performance.md."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch's eager quantization is marked for removal
        warnings.simplefilter("ignore")
        per_channel = {nn.Linear: per_channel_dynamic_qconfig}
        quantized = quantize_dynamic(copy.deepcopy(model), per_channel, dtype=torch.qint8)
        embedding = model.decoder.embedding.weight.detach().float()
        tied = nn.Linear(embedding.size(1), embedding.size(0), bias=model.output_bias is not None)
        tied.weight = nn.Parameter(embedding.clone())
        if model.output_bias is not None:
            tied.bias = nn.Parameter(model.output_bias.detach().float().clone())
        projection = quantize_dynamic(nn.Sequential(tied), per_channel, dtype=torch.qint8)[0]
    quantized.int8_projection = projection
    quantized.project = projection.forward  # this instance's output projection
    return quantized
