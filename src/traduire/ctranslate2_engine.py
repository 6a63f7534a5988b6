"""CTranslate2, the C++ inference engine, as the search of a Translator: it decodes the
sentences traduire has tokenised and batched, on a model `traduire export` wrote (export.py).

Differences from traduire's own search, all CTranslate2's: BOS and padding are left out of each
step's distribution before it is normalised, not after (with α = 0 the best output is the one
traduire finds on that renormalised distribution); the length penalty divides the
log-probability by length^α instead of ((5 + length) / 6)^α; a hypothesis at the length limit
ends without EOS, and the search stops at one length limit per batch, after which each
sentence's output is cut to its own limit; n-best lists end once `beam` hypotheses have; and
per-token log-probabilities are not reported.

Needs the `ctranslate2` package (`pip install 'traduire[ctranslate2]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from traduire.batch import output_limits, source_batch
from traduire.errors import TraduireError
from traduire.search import Hypothesis, SearchOptions, parse_sampling
from traduire.tokenizer import Tokenizer

# translate --precision, in CTranslate2's words: auto keeps the type the model was exported in.
COMPUTE_TYPES = {"auto": "default", "fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


def ctranslate2_module() -> Any:
    """The ctranslate2 package, or a one-line error saying how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise TraduireError("the ctranslate2 package is not installed: "
                            "pip install 'traduire[ctranslate2]'") from None
    return ctranslate2


class CTranslate2Engine:
    """Searches with a CTranslate2 Translator on the pieces of traduire's tokenizer."""

    def __init__(self, translator: Any, tokenizer: Tokenizer, max_positions: int,
                 compute_type: str) -> None:
        self.translator, self.tokenizer, self.compute_type = translator, tokenizer, compute_type
        self.max_positions = max_positions
        self.model_file: Path | None = None  # the model.bin it loaded, where it did
        tok = tokenizer
        self.src_vocab = tok.src_pieces(list(range(tok.src_vocab_size)))
        self.tgt_ids = {p: i for i, p in enumerate(tok.tgt_pieces(range(tok.tgt_vocab_size)))}
        # As in traduire's search, BOS and padding are never generated.
        self.never = [tok.tgt_pieces([i]) for i in (tok.bos_id, tok.pad_id)]

    @classmethod
    def open(cls, model_dir: Path, run_dir: Path, tokenizer: Tokenizer, max_positions: int,
             device: str = "cpu", precision: str = "auto", threads: int = 0
             ) -> CTranslate2Engine:
        """The exported model in `model_dir`, computing in `precision` (a key of
        COMPUTE_TYPES) on `device` ("cpu" or "cuda")."""
        ct2 = ctranslate2_module()
        if precision not in COMPUTE_TYPES:
            raise TraduireError(f"precision {precision!r}: expected one of "
                                f"{', '.join(COMPUTE_TYPES)}")
        if not (Path(model_dir) / "model.bin").is_file():
            raise TraduireError(f"{model_dir}: no CTranslate2 model here; write one with "
                                f"'traduire export --run-dir {run_dir}'")
        try:
            translator = ct2.Translator(str(model_dir),
                                        device="cuda" if device == "cuda" else "cpu",
                                        compute_type=COMPUTE_TYPES[precision],
                                        intra_threads=threads or torch.get_num_threads())
        except (RuntimeError, ValueError) as error:
            raise TraduireError(f"{model_dir}: CTranslate2 cannot load this model ({error})"
                                ) from None
        engine = cls(translator, tokenizer, max_positions, COMPUTE_TYPES[precision])
        engine.model_file = Path(model_dir) / "model.bin"
        return engine

    def decode(self, src_ids: list[list[int]], options: SearchOptions,
               generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
        """n-best lists in input order, as search.decode returns them (sampling is seeded by
        options.seed, not by `generator`)."""
        tok = self.tokenizer
        pieces = [[self.src_vocab[i] for i in ids] for ids in src_ids]
        limits = output_limits(source_batch(src_ids, pad=tok.pad_id, eos=tok.eos_id),
                               tok.pad_id, options.max_len_a, options.max_len_b,
                               self.max_positions).tolist()
        search: dict[str, Any] = dict(beam_size=options.beam, num_hypotheses=options.nbest,
                                      length_penalty=options.lenpen)
        if options.sample is not None:
            top_k, top_p = parse_sampling(options.sample)
            ctranslate2_module().set_random_seed(options.seed)
            search = dict(beam_size=1, sampling_topk=top_k or 0, sampling_topp=top_p or 1.0,
                          sampling_temperature=options.temperature)
        # min_decoding_length 0: as in traduire's search, EOS may come first (an empty
        # translation); CTranslate2's default of 1 would force a token before it.
        results = self.translator.translate_batch(
            pieces, max_decoding_length=max(limits) + 1, min_decoding_length=0,
            return_scores=True, return_end_token=False, suppress_sequences=self.never, **search)
        alpha = options.lenpen if options.sample is None else 0.0
        out = []
        for result, limit in zip(results, limits):
            hyps = []
            for tokens, score in zip(result.hypotheses, result.scores):
                # At the length limit traduire ends a hypothesis with EOS; CTranslate2 stops one
                # token later without it.
                ids = [self.tgt_ids.get(p, tok.unk_id) for p in tokens][:limit]
                # CTranslate2's score is logprob / (length + 1)^α, EOS counted.
                hyps.append(Hypothesis(ids, score * (len(ids) + 1) ** alpha, score, []))
            out.append(hyps)
        return out
