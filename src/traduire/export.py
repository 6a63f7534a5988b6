"""Export a trained model to CTranslate2, the C++ inference engine, and translate with it.

traduire's Transformer maps one to one onto CTranslate2's Transformer specification: packed
query/key/value projections, pre- or post-norm, sinusoidal positions, embeddings scaled by
sqrt(d_model), the output projection tied to the target embeddings. The weights are copied as
they are; CTranslate2 quantises them on export or on load (`compute_type`).

Needs the `ctranslate2` package (`pip install 'traduire[ctranslate2]'`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from traduire.batch import output_limits, source_batch
from traduire.device import resolve_device
from traduire.errors import TraduireError
from traduire.files import replace_directory
from traduire.model import MultiHeadAttention, Sublayer, Transformer
from traduire.search import Hypothesis
from traduire.tokenizer import Tokenizer
from traduire.translate import DecodeOptions, Translator, parse_sampling

QUANTIZATIONS = ("float32", "bfloat16", "float16", "int8", "int8_float32", "int8_bfloat16")
# translate --precision, in CTranslate2's words: auto keeps the type the model was exported in.
COMPUTE_TYPES = {"auto": "default", "fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise TraduireError("the ctranslate2 package is not installed: "
                            "pip install 'traduire[ctranslate2]'") from None
    return ctranslate2


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
    _ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    shape = model.shape
    activation = {"relu": common_spec.Activation.RELU,
                  "gelu": common_spec.Activation.GELU}[shape.activation]
    spec = transformer_spec.TransformerSpec.from_config(
        (shape.encoder_layers, shape.decoder_layers), shape.heads,
        pre_norm=shape.norm == "pre", activation=activation)
    positions = _numpy(model.encoder.positions.table)
    for stack, torch_stack in ((spec.encoder, model.encoder), (spec.decoder, model.decoder)):
        stack.scale_embeddings = True
        stack.position_encodings.encodings = positions
        if shape.norm == "pre":
            _set_norm(stack.layer_norm, torch_stack.final_norm)
    spec.encoder.embeddings[0].weight = _numpy(model.encoder.embedding.weight)
    spec.decoder.embeddings.weight = _numpy(model.decoder.embedding.weight)
    spec.decoder.projection.weight = _numpy(model.decoder.embedding.weight)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers, strict=True):
        _set_attention(layer_spec.self_attention, layer.self_attn, layer.attn_block)
        _set_ffn(layer_spec.ffn, layer)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers, strict=True):
        _set_attention(layer_spec.self_attention, layer.self_attn, layer.self_block)
        _set_attention(layer_spec.attention, layer.cross_attn, layer.cross_block)
        _set_ffn(layer_spec.ffn, layer)

    pieces = tokenizer.tgt_pieces(list(range(tokenizer.tgt_vocab_size)))
    spec.register_source_vocabulary(
        [tokenizer.src.id_to_piece(i) for i in range(tokenizer.src_vocab_size)])
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
    if out_dir.exists() and not out_dir.is_dir():
        raise TraduireError(f"{out_dir}: is a file, not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "model.bin").is_file():
            raise TraduireError(f"{out_dir}: a non-empty directory that is not a CTranslate2 "
                                "model; not replacing it")
        if not force:
            raise TraduireError(f"{out_dir}: already exists (use --force to replace it)")
    spec = ctranslate2_spec(translator.model, translator.tokenizer)
    spec.validate()
    spec.optimize(quantization=quantization)
    # Written beside the target and swapped in, so a failed export never leaves half a model
    # and a crash never leaves neither.
    with replace_directory(out_dir) as tmp:
        spec.save(str(tmp))
    return out_dir


def load_translator(run_dir: Path, engine: str = "torch", engine_dir: Path | None = None,
                    checkpoint: Path | None = None, device: str = "auto",
                    precision: str = "auto") -> Translator:
    """A Translator of the run searching with `engine`: torch (traduire's own search), or
    ctranslate2 on the model `traduire export` wrote (in `engine_dir`, default RUN/ctranslate2)."""
    if engine_dir is not None and engine != "ctranslate2":
        raise TraduireError("--engine-dir needs --engine ctranslate2")
    if engine == "torch":
        return Translator.load(run_dir, checkpoint, device, precision)
    if engine != "ctranslate2":
        raise TraduireError(f"--engine {engine!r}: expected torch or ctranslate2")
    if checkpoint is not None:
        raise TraduireError("--checkpoint does not apply to --engine ctranslate2: export that "
                            "checkpoint with 'traduire export --checkpoint FILE'")
    return CTranslate2Translator.open(run_dir, engine_dir, device=resolve_device(device).type,
                                      precision=precision)


class CTranslate2Translator(Translator):
    """A Translator whose search runs in CTranslate2 on an exported model. Tokenisation, batching
    and output are traduire's.

    Differences from traduire's own search, all CTranslate2's: BOS and padding are left out of
    each step's distribution before it is normalised, not after (with α = 0 the best output is
    the one traduire finds on that renormalised distribution); the length penalty divides the
    log-probability by length^α instead of ((5 + length) / 6)^α; a hypothesis at the length
    limit ends without EOS, and the search stops at one length limit per batch, which each
    sentence's output is then cut to its own limit; n-best lists end once `beam` hypotheses
    have; and per-token log-probabilities are not reported.
    """

    def __init__(self, base: Translator, engine, compute_type: str) -> None:
        super().__init__(base.model, base.tokenizer, base.config, base.device, base.checkpoint)
        self.engine, self.compute_type = engine, compute_type
        tok = self.tokenizer
        self.src_vocab = [tok.src.id_to_piece(i) for i in range(tok.src_vocab_size)]
        self.tgt_ids = {p: i for i, p in enumerate(tok.tgt_pieces(range(tok.tgt_vocab_size)))}
        # As in traduire's search, BOS and padding are never generated.
        self.never = [tok.tgt_pieces([i]) for i in (tok.bos_id, tok.pad_id)]

    @classmethod
    def open(cls, run_dir: Path, model_dir: Path | None = None, device: str = "cpu",
             precision: str = "auto", threads: int = 0) -> CTranslate2Translator:
        """The exported model in `model_dir` (default RUN/ctranslate2), computing in
        `precision` (a key of COMPUTE_TYPES)."""
        ct2 = _ctranslate2()
        if precision not in COMPUTE_TYPES:
            raise TraduireError(f"precision {precision!r}: expected one of "
                                f"{', '.join(COMPUTE_TYPES)}")
        model_dir = Path(model_dir) if model_dir else Path(run_dir) / "ctranslate2"
        if not (model_dir / "model.bin").is_file():
            raise TraduireError(f"{model_dir}: no CTranslate2 model here; write one with "
                                f"'traduire export --run-dir {run_dir}'")
        base = Translator.load(run_dir, device="cpu", precision="fp32")
        try:
            engine = ct2.Translator(str(model_dir), device="cuda" if device == "cuda" else "cpu",
                                    compute_type=COMPUTE_TYPES[precision],
                                    intra_threads=threads or torch.get_num_threads())
        except (RuntimeError, ValueError) as error:
            raise TraduireError(f"{model_dir}: CTranslate2 cannot load this model ({error})"
                                ) from None
        return cls(base, engine, COMPUTE_TYPES[precision])

    def translate_ids(self, src_ids: list[list[int]], options: DecodeOptions,
                      generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
        tok = self.tokenizer
        pieces = [[self.src_vocab[i] for i in ids] for ids in src_ids]
        limits = output_limits(source_batch(src_ids, pad=tok.pad_id, eos=tok.eos_id),
                               tok.pad_id, options.max_len_a, options.max_len_b,
                               self.model.shape.max_positions).tolist()
        search = dict(beam_size=options.beam, num_hypotheses=options.nbest,
                      length_penalty=options.lenpen)
        if options.sample is not None:
            top_k, top_p = parse_sampling(options.sample)
            _ctranslate2().set_random_seed(options.seed)
            search = dict(beam_size=1, sampling_topk=top_k or 0, sampling_topp=top_p or 1.0,
                          sampling_temperature=options.temperature)
        # min_decoding_length 0: as in traduire's search, EOS may come first (an empty
        # translation); CTranslate2's default of 1 would force a token before it.
        results = self.engine.translate_batch(pieces, max_decoding_length=max(limits) + 1,
                                              min_decoding_length=0, return_scores=True,
                                              return_end_token=False,
                                              suppress_sequences=self.never, **search)
        out = []
        for result, limit in zip(results, limits):
            hyps = []
            for tokens, score in zip(result.hypotheses, result.scores):
                # At the length limit traduire ends a hypothesis with EOS; CTranslate2 stops one
                # token later without it.
                ids = [self.tgt_ids.get(p, tok.unk_id) for p in tokens][:limit]
                # CTranslate2's score is logprob / (length + 1)^α, EOS counted.
                logprob = score * (len(ids) + 1) ** (options.lenpen if options.sample is None
                                                     else 0.0)
                hyps.append(Hypothesis(ids, logprob, score, []))
            out.append(hyps)
        return out
