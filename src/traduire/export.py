"""Export a trained model to CTranslate2, the C++ inference engine (translating with the
export: ctranslate2_engine.py).

traduire's Transformer maps one to one onto CTranslate2's Transformer specification: packed
query/key/value projections, pre- or post-norm, sinusoidal positions, embeddings scaled by
sqrt(d_model), the output projection tied to the target embeddings. The weights are copied as
they are; CTranslate2 quantises them on export or on load (`compute_type`).

Needs the `ctranslate2` package (`pip install 'traduire[ctranslate2]'`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from traduire.ctranslate2_engine import ctranslate2_module
from traduire.errors import TraduireError
from traduire.files import check_export_dir, replace_directory
from traduire.model import MultiHeadAttention, Sublayer, Transformer
from traduire.tokenizer import Tokenizer
from traduire.translate import Translator

QUANTIZATIONS = ("float32", "bfloat16", "float16", "int8", "int8_float32", "int8_bfloat16")


def _numpy(tensor: torch.Tensor):
    return tensor.detach().float().cpu().numpy()


def _set_norm(spec, norm: torch.nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _numpy(norm.weight), _numpy(norm.bias)


def _set_linear(spec, linear: torch.nn.Linear) -> None:
    spec.weight, spec.bias = _numpy(linear.weight), _numpy(linear.bias)


def _set_attention(spec, attention: MultiHeadAttention, block: Sublayer) -> None:
    # CTranslate2 keeps a sublayer's LayerNorm with its attention (before it in pre-norm, after
    # the residual sum in post-norm), as traduire's Sublayer does.
    _set_norm(spec.layer_norm, block.norm)
    if attention.cross:
        linears = [attention.q_proj, attention.kv_proj, attention.out_proj]
    else:
        linears = [attention.qkv_proj, attention.out_proj]
    for linear_spec, linear in zip(spec.linear, linears, strict=True):
        _set_linear(linear_spec, linear)


def _set_ffn(spec, layer) -> None:
    _set_norm(spec.layer_norm, layer.ffn_block.norm)
    _set_linear(spec.linear_0, layer.ffn.linear1)
    _set_linear(spec.linear_1, layer.ffn.linear2)


def ctranslate2_spec(model: Transformer, tokenizer: Tokenizer):
    """The CTranslate2 model specification holding `model`'s weights and vocabularies."""
    ctranslate2_module()
    from ctranslate2.specs import common_spec, transformer_spec

    shape = model.shape
    activation = {"relu": common_spec.Activation.RELU,
                  "gelu": common_spec.Activation.GELU,
                  "swish": common_spec.Activation.SWISH}[shape.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (shape.encoder_layers, shape.decoder_layers), shape.heads,
        pre_norm=shape.norm == "pre", activation=activation)
    positions = _numpy(model.encoder.positions.table)
    for stack, torch_stack in ((spec.encoder, model.encoder), (spec.decoder, model.decoder)):
        stack.scale_embeddings = shape.scale_embedding
        stack.position_encodings.encodings = positions
        if shape.norm == "pre":
            _set_norm(stack.layer_norm, torch_stack.final_norm)
    spec.encoder.embeddings[0].weight = _numpy(model.encoder.embedding.weight)
    spec.decoder.embeddings.weight = _numpy(model.decoder.embedding.weight)
    spec.decoder.projection.weight = _numpy(model.decoder.embedding.weight)
    if model.output_bias is not None:
        spec.decoder.projection.bias = _numpy(model.output_bias)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers, strict=True):
        _set_attention(layer_spec.self_attention, layer.self_attn, layer.attn_block)
        _set_ffn(layer_spec.ffn, layer)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers, strict=True):
        _set_attention(layer_spec.self_attention, layer.self_attn, layer.self_block)
        _set_attention(layer_spec.attention, layer.cross_attn, layer.cross_block)
        _set_ffn(layer_spec.ffn, layer)

    pieces = tokenizer.tgt_pieces(list(range(tokenizer.tgt_vocab_size)))
    spec.register_source_vocabulary(tokenizer.src_pieces(list(range(tokenizer.src_vocab_size))))
    spec.register_target_vocabulary(pieces)
    spec.config.unk_token = pieces[tokenizer.unk_id]
    spec.config.bos_token = spec.config.decoder_start_token = pieces[tokenizer.bos_id]
    spec.config.eos_token = pieces[tokenizer.eos_id]
    spec.config.add_source_eos = True  # traduire's sources end with EOS
    spec.config.layer_norm_epsilon = model.decoder.layers[0].ffn_block.norm.eps
    return spec


def export_ctranslate2(translator: Translator, out_dir: Path, quantization: str | None = None,
                       force: bool = False) -> Path:
    """Write `translator`'s model as a CTranslate2 model directory; returns it."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise TraduireError(f"quantization {quantization!r}: expected one of "
                            f"{', '.join(QUANTIZATIONS)}")
    out_dir = Path(out_dir)
    check_export_dir(out_dir, "model.bin", "CTranslate2", force)
    spec = ctranslate2_spec(translator.model, translator.tokenizer)
    spec.validate()
    spec.optimize(quantization=quantization)
    # Written beside the target and swapped in, so a failed export never leaves half a model
    # and a crash never leaves neither.
    with replace_directory(out_dir) as tmp:
        spec.save(str(tmp))
    return out_dir
