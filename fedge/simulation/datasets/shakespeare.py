"""Federated Shakespeare (next-character prediction) from LEAF JSON, TFF's `shakespeare*.h5` or play text.

Characters map to ids with TFF's vocabulary so models match TFF's: 0 is padding, the 86
characters of `CHAR_VOCAB` are 1..86, anything else is `OOV_ID` (87); TFF also reserves 88 and
89 for begin/end of snippet, hence `VOCAB_SIZE` 90. Both loaders give ClientData with x int32
[N, seq_length] (the preceding characters) and y int32 [N] (the next character), one client
per speaking role; `load_leaf_text` and `load_tff_h5_text` return the raw strings.
`load_play_text` reads a play (`Name:` on its own line, then the speech) into TFF's text
tutorial's sequences: x and y int32 [N, seq_length], y being x shifted by one character.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedge.simulation.datasets import _h5, _leaf
from fedge.simulation.datasets._checks import require_int
from fedge.simulation.datasets.client_data import ClientData, ClientDataset

CHAR_VOCAB = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
PAD_ID = 0
OOV_ID = len(CHAR_VOCAB) + 1
BOS_ID = len(CHAR_VOCAB) + 2  # begin and end of a snippet (a speech), as TFF's tutorial marks them
EOS_ID = len(CHAR_VOCAB) + 3
VOCAB_SIZE = len(CHAR_VOCAB) + 4
SEQUENCE_LENGTH = 80

_LOOKUP = np.full(128, OOV_ID, dtype=np.int32)
_LOOKUP[[ord(c) for c in CHAR_VOCAB]] = np.arange(1, len(CHAR_VOCAB) + 1, dtype=np.int32)


def encode(text: str) -> np.ndarray:
    """Character ids (int32 [len(text)]) of a string under `CHAR_VOCAB`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, _LOOKUP[np.minimum(codes, 127)], OOV_ID).astype(np.int32)


def decode(ids: np.ndarray) -> str:
    """The string of character ids; padding is dropped and out-of-vocabulary ids become U+FFFD."""
    table = "\ufffd" + CHAR_VOCAB
    return "".join(table[i] if 0 < i <= len(CHAR_VOCAB) else "\ufffd" for i in np.asarray(ids).ravel() if i != PAD_ID)


def load_leaf_text(path: str | Path) -> dict[str, tuple[list[str], list[str]]]:
    """LEAF Shakespeare as raw strings: `{user: (x snippets, y next characters)}`."""
    users = _leaf.read_users(path)
    for user, (x, y) in users.items():
        if not all(isinstance(s, str) for s in x) or not all(isinstance(c, str) and len(c) == 1 for c in y):
            raise ValueError(f"{path}: user {user!r}: 'x' must be strings and 'y' single characters")
    return users


def load_leaf(path: str | Path, seq_length: int = SEQUENCE_LENGTH) -> ClientData:
    """LEAF Shakespeare as ids: x int32 [N, seq_length] from `x` strings of that length, y int32 [N]."""
    mapping = {}
    for user, (x, y) in load_leaf_text(path).items():
        if any(len(s) != seq_length for s in x):
            raise ValueError(f"{path}: user {user!r}: every 'x' string must have {seq_length} characters")
        ids = encode("".join(x)).reshape(len(x), seq_length)
        mapping[user] = (ids, encode("".join(y)))
    return ClientData.from_arrays(mapping)


def load_tff_h5_text(path: str | Path) -> dict[str, list[str]]:
    """TFF's `shakespeare*.h5` as raw strings: `{client_id: snippets}`."""
    return {cid: _snippets(path, cid) for cid in _snippet_clients(path)}


def load_tff_h5(path: str | Path, seq_length: int = SEQUENCE_LENGTH, stride: int = 1) -> ClientData:
    """TFF's `shakespeare*.h5` as next-character examples, built per client on request (see `snippet_examples`)."""
    require_int("seq_length", seq_length, 1)
    require_int("stride", stride, 1)

    def load(client_id: str) -> ClientDataset:
        pairs = [snippet_examples(s, seq_length, stride) for s in _snippets(path, client_id)]
        x = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros((0, seq_length), np.int32)
        y = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int32)
        return ClientDataset(x, y)

    return ClientData.from_function(_snippet_clients(path), load)


def snippet_examples(
    snippet: str, seq_length: int = SEQUENCE_LENGTH, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Next-character examples of one snippet: every `stride`-th character from the first is a target.

    Each target's input is the `seq_length` ids before it in the snippet, PAD-filled at the start
    (LEAF's scheme, except that LEAF drops the first `seq_length` targets instead of padding, which
    would lose every short snippet).
    """
    seq_length, stride = require_int("seq_length", seq_length, 1), require_int("stride", stride, 1)
    ids = encode(snippet)
    padded = np.concatenate([np.full(seq_length, PAD_ID, np.int32), ids])
    targets = np.arange(0, len(ids), stride)
    return padded[targets[:, None] + np.arange(seq_length)], ids[targets]


def _snippet_clients(path: str | Path) -> list[str]:
    """Client ids of a TFF Shakespeare file, checking each holds a 1-D `snippets` dataset."""
    shapes = _h5.feature_shapes(path, ("snippets",))
    for client_id, shape in shapes.items():
        if len(shape["snippets"]) != 1:
            raise ValueError(f"{path}: client {client_id!r}: snippets must be 1-D, got shape {shape['snippets']}")
    return list(shapes)


def _snippets(path: str | Path, client_id: str) -> list[str]:
    """One client's snippets as str (h5py returns variable-length strings as bytes)."""
    raw = _h5.read_client(path, client_id, ("snippets",))["snippets"]
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in np.atleast_1d(raw).tolist()]


def read_play(path: str | Path) -> dict[str, list[str]]:
    """The speeches of a play, `{role: [speech, ...]}` in order of first appearance.

    Speeches are blocks separated by blank lines; each starts with the speaker's `Name:` on its
    own line (the layout of tinyshakespeare.txt). ValueError names the line of a block without one.
    """
    speeches: dict[str, list[str]] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    block: list[tuple[int, str]] = []
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            block.append((number, line))
            continue
        if block:
            first_line, heading = block[0]
            role = heading.strip()[:-1].strip()
            if not heading.strip().endswith(":") or not role or ":" in role:
                raise ValueError(f"{path}:{first_line}: a speech must start with 'Name:' on its own line, "
                                 f"got {heading!r}")
            text = "\n".join(text for _, text in block[1:])
            if text:
                speeches.setdefault(role, []).append(text)
            block = []
    if not speeches:
        raise ValueError(f"{path}: no speech found (expected blocks of 'Name:' then its lines)")
    return speeches


def snippet_sequences(snippets: list[str], seq_length: int = SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """TFF's text-tutorial examples of one client: its snippets as ids, each between BOS and EOS,
    concatenated and cut into chunks of seq_length + 1; x is a chunk without its last id, y
    without its first (the next character at every position). The last chunk is PAD-filled
    instead of dropped, so a loss with `ignore_class=PAD_ID` skips exactly the padding."""
    seq_length = require_int("seq_length", seq_length, 1)
    ids = np.concatenate([np.zeros(0, np.int32), *[np.concatenate([[BOS_ID], encode(s), [EOS_ID]]) for s in snippets]])
    chunks = -(-len(ids) // (seq_length + 1))
    padded = np.full(chunks * (seq_length + 1), PAD_ID, np.int32)
    padded[: len(ids)] = ids
    padded = padded.reshape(chunks, seq_length + 1)
    return padded[:, :-1], padded[:, 1:]


def load_play_text(path: str | Path, seq_length: int = SEQUENCE_LENGTH) -> ClientData:
    """A play's speaking roles as clients (`read_play`), each with `snippet_sequences` of its speeches."""
    require_int("seq_length", seq_length, 1)
    return ClientData.from_arrays({role: snippet_sequences(speeches, seq_length)
                                   for role, speeches in read_play(path).items()})
