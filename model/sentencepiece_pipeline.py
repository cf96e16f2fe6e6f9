"""A ``tokenizers`` pipeline that encodes and decodes like ``sentencepiece.SentencePieceProcessor``.

Everything is read off the model's own ``ModelProto`` (parsed with the protobuf module that the
``sentencepiece`` package ships), never guessed from the vocabulary:

- ``normalizer_spec``: the precompiled character map of the normalization rule (``identity`` has
  none; ``nmt_nfkc``, ``nfkc``, ``nmt_nfkc_cf``, ``nfkc_cf`` and user rules do, and run through
  ``normalizers.Precompiled``), ``add_dummy_prefix`` and ``remove_extra_whitespaces``, in the
  order of SentencePiece's ``Normalizer::Normalize``; ``escape_whitespaces`` must be true (the
  trainers accept nothing else);
- ``trainer_spec``: the model type (BPE or Unigram), ``byte_fallback`` and the unknown piece;
- the pieces' types: only NORMAL pieces are merged (BPE), CONTROL/UNKNOWN/BYTE pieces never come
  out of text, USER_DEFINED pieces are returned by :func:`user_defined_pieces` for the caller to
  register as added tokens (SentencePiece emits them whole).

Decoding mirrors ``SentencePieceProcessor.decode``: "▁" becomes a space, byte pieces are joined
into UTF-8, and one leading space is dropped only when the model adds a dummy prefix or removes
extra whitespace (MiniCPM4's model does neither, so its decoded text keeps a leading space).

Known limits. ``normalizers.Precompiled`` (tokenizers) maps every single code point as
SentencePiece does, but transforms a grapheme shorter than 6 bytes by its shortest mapped prefix
and drops the rest: a compatibility character or a decomposed letter followed by a combining mark
loses the mark ("Ａ\u0301" gives "A", SentencePiece "Á"; NFD "Tiếng Việt" gives "Tiêng Viẹt"),
and a longer grapheme is mapped one code point at a time (halfwidth "ｶﾞ" gives "カ\u3099" where
SentencePiece composes "ガ"); CR LF, the common case, is handled before the map. Measured
over the 1,112,064 code points one by one: no difference for nmt_nfkc, nfkc, nmt_nfkc_cf and
nfkc_cf; over 40,000 random 2-4 code point strings: 78 (nfkc, nmt_nfkc) and 115 (the _cf rules).
Identity models (MiniCPM4, Llama) have no map and are not affected. Outside what ``encode``
produces from text: a run of byte ids that is not valid UTF-8 decodes to one U+FFFD per byte
(SentencePiece keeps the valid characters inside the run); the unknown id decodes to its piece
(``<unk>``), not SentencePiece's surface " ⁇ "; with ``remove_extra_whitespaces`` SentencePiece
drops one "▁" from every leading piece while its text is still empty, this decoder one in all.
Unigram only: tokenizers' lattice holds every piece, so a literal byte-piece name such as "<0x41>"
in the text can come out as that byte piece; and where two segmentations tie exactly (a long run
of one character, e.g. 17 spaces before "x" with whitespace-only pieces kept), SentencePiece's
float32 sums pick one by rounding (-27.915085 against -27.915089 for two segmentations whose
exact sums are equal), tokenizers' float64 sums the other.
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from hal.errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPACE_SYMBOL = "\u2581"
"""SentencePiece's escaped space (LOWER ONE EIGHTH BLOCK)."""


def model_proto_module() -> Any:
    """The ``sentencepiece_model_pb2`` module shipped with ``sentencepiece`` (needs ``protobuf``)."""
    reasons = []
    for name in ("sentencepiece.sentencepiece_model_pb2", "sentencepiece_model_pb2"):  # older wheels
        try:
            return importlib.import_module(name)
        except Exception as exc:  # ImportError, or protobuf's VersionError for a mismatched runtime
            reasons.append(" ".join(str(exc).split()))
    raise ImportError(
        "reading a SentencePiece model needs the sentencepiece and protobuf packages "
        f"(pip install sentencepiece protobuf): {reasons[0]}"
    )


def read_model_proto(spm_file: str) -> Any:
    """Parse ``spm_file`` into a ``sentencepiece.ModelProto``; ``CheckpointError`` names the file."""
    name = os.path.basename(spm_file)
    try:
        model_pb2 = model_proto_module()
    except ImportError as exc:
        raise CheckpointError(f"cannot read {name} ({spm_file}): {exc}") from exc
    try:
        with open(spm_file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read {name} ({spm_file}): {exc}") from exc
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError; its type depends on the backend
        raise CheckpointError(f"{name} is not a SentencePiece model ({spm_file}): {exc}") from exc
    if not proto.pieces:
        raise CheckpointError(f"{name} is not a SentencePiece model ({spm_file}): it has no pieces")
    return proto


def pipeline_from_proto(proto: Any, source: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` (model, normalizer, decoder) equal to SentencePiece on ``proto``.

    ``source`` names the file in error messages. Added tokens and post-processing (BOS) are the
    caller's: a checkpoint folder's config decides them. Raises ``CheckpointError`` (one line,
    naming ``source`` and the field) for what SentencePiece does that this pipeline cannot.
    """
    from tokenizers import Tokenizer

    _check_supported(proto, source)
    backend = Tokenizer(_model(proto))
    backend.normalizer = _normalizer(proto.normalizer_spec)
    backend.decoder = _decoder(proto)
    return backend


def user_defined_pieces(proto: Any) -> list[str]:
    """The USER_DEFINED pieces, in id order: SentencePiece matches them in the raw text."""
    user_defined = model_proto_module().ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in proto.pieces if p.type == user_defined]


def _check_supported(proto: Any, source: str) -> None:
    model_pb2 = model_proto_module()
    trainer = proto.trainer_spec
    model_types = model_pb2.TrainerSpec.ModelType
    if trainer.model_type not in (model_types.Value("BPE"), model_types.Value("UNIGRAM")):
        kind = model_types.Name(trainer.model_type)
        raise CheckpointError(
            f"{source}: trainer_spec.model_type is {kind}; only BPE and UNIGRAM models are supported"
        )
    if trainer.treat_whitespace_as_suffix:
        raise CheckpointError(f"{source}: trainer_spec.treat_whitespace_as_suffix is not supported")
    if not proto.normalizer_spec.escape_whitespaces:
        # SentencePiece's trainers refuse it too; its decoder would still turn "▁" into spaces.
        raise CheckpointError(f"{source}: normalizer_spec.escape_whitespaces false is not supported")
    if proto.HasField("denormalizer_spec") and proto.denormalizer_spec.precompiled_charsmap:
        raise CheckpointError(f"{source}: a denormalizer_spec rule is not supported (decoding would differ)")
    unused = model_pb2.ModelProto.SentencePiece.UNUSED
    unused_ids = [i for i, p in enumerate(proto.pieces) if p.type == unused]
    if unused_ids:
        raise CheckpointError(
            f"{source}: {len(unused_ids)} pieces have type UNUSED (first id {unused_ids[0]}), which "
            "SentencePiece re-splits after merging; not supported"
        )


def _model(proto: Any) -> Any:
    from tokenizers.models import BPE, Unigram

    pieces = proto.pieces
    trainer = proto.trainer_spec
    byte_fallback = bool(trainer.byte_fallback)
    if trainer.model_type == model_proto_module().TrainerSpec.ModelType.Value("UNIGRAM"):
        return Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id, byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    return BPE(
        vocab=vocab, merges=bpe_merges(proto), unk_token=pieces[trainer.unk_id].piece,
        fuse_unk=True, byte_fallback=byte_fallback,
    )


def bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's: every split of a NORMAL piece into two NORMAL
    pieces, best piece score first (SentencePiece merges the adjacent pair whose concatenation
    scores highest). Splits of one piece keep their order by id of the merged piece, then longer
    left part first: SentencePiece breaks such ties by the leftmost position, which for a run of
    one character (spaces, dashes) is the split whose left part is longer.
    """
    normal = model_proto_module().ModelProto.SentencePiece.NORMAL
    scores = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == normal}
    ranked = []
    for piece, (score, piece_id) in scores.items():
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                ranked.append((-score, piece_id, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(spec: Any) -> Any:
    """SentencePiece's ``Normalizer::Normalize`` as a ``normalizers.Sequence``.

    The order matters: the character map first; then (``remove_extra_whitespaces``) runs of spaces
    collapse and a leading space goes, before the dummy prefix is added; spaces are escaped; then
    trailing escaped spaces go (SentencePiece strips them after escaping, so a literal "▁" at the
    end goes too). Without whitespace removal the dummy prefix comes before the character map, so
    a text that the map deletes entirely still yields "▁", as SentencePiece's does. Only " " counts
    as whitespace here, as in SentencePiece: tabs and newlines are left to the character map.
    """
    from tokenizers import Regex, normalizers

    steps: list[Any] = []
    if spec.add_dummy_prefix and not spec.remove_extra_whitespaces:
        steps.append(normalizers.Prepend(" "))
    if spec.precompiled_charsmap:
        steps += _crlf_as_sentencepiece_maps_it(spec)
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A "), "")]
        if spec.add_dummy_prefix:
            steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", SPACE_SYMBOL))
    if spec.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(f"{SPACE_SYMBOL}+\\z"), ""))
    return normalizers.Sequence(steps)


def _crlf_as_sentencepiece_maps_it(spec: Any) -> list[Any]:
    """CR LF is one grapheme, and ``Precompiled`` maps a short grapheme by its shortest mapped
    prefix: under the NMT rules it would turn "\r\n" into one space, where SentencePiece maps CR
    and LF one by one (two spaces). This replaces CR LF by SentencePiece's own mapping of it
    beforehand, when that mapping differs and the map leaves it unchanged."""
    import sentencepiece as spm
    from tokenizers import normalizers

    raw_map = spm.SentencePieceNormalizer(
        normalizer_spec=spec, add_dummy_prefix=False, escape_whitespaces=False,
        remove_extra_whitespaces=False,
    )
    mapped = raw_map.normalize("\r\n")
    if mapped == "\r\n" or raw_map.normalize(mapped) != mapped:
        return []
    return [normalizers.Replace("\r\n", mapped)]


def _decoder(proto: Any) -> Any:
    """SentencePiece's ``Decode``: control pieces are the caller's special tokens (skipped), "▁" is
    a space, byte pieces join into UTF-8, and one leading "▁" goes when the model adds a dummy
    prefix or removes extra whitespace (``Strip`` after ``Fuse``, so only the text's start)."""
    from tokenizers import decoders

    spec = proto.normalizer_spec
    steps: list[Any] = [decoders.Replace(SPACE_SYMBOL, " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)
