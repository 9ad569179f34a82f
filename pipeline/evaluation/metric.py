"""`RetrievalMetrics`: the protocol as a torchmetrics Metric, whose state lives on the device and is
gathered across ranks; `compute` de-duplicates by id and calls `evaluate`."""
from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric

from pipeline.evaluation.protocol import evaluate
from pipeline.evaluation.scores import as_tensor, pack_codes


class RetrievalMetrics(Metric):
    """Accumulates embeddings (or packed codes) with ids; ``compute`` = :func:`evaluate`.

    ``update(image_feats, image_ids, image_labels, text_feats, text_ids,
    text_image_ids)``: int64 ids; image ids unique per image, text ids unique
    per caption, ``text_image_ids`` the image id of each caption. Either side
    may be empty (None or zero rows) in a call. States stay on the metric's
    device and are concatenated across ranks (``dist_reduce_fx="cat"``).

    ``compute`` keeps the first copy of each id (DistributedSampler pads by
    repeating samples: a record seen twice counts once), orders images and
    captions by id, so the result does not depend on which rank saw what or in
    which order, maps captions to images by id (a caption whose image was never
    seen raises ``ValueError``), and returns :func:`evaluate`'s dict.

    ``code_prefixes`` (hamming only; multiples of 8): leading bit counts of the codes evaluated as
    codes of their own (nested codes), on the packed prefix: the first L bits of an MSB-first packed
    code are its first L / 8 bytes. Their results come as ``<L>bit/<name>``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    _STATES = ("image_feats", "image_ids", "image_labels", "text_feats", "text_ids", "text_image_ids")
    _DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
               torch.int16, torch.int32, torch.int64)

    def __init__(self, measure: str = "cosine", ks: Sequence[int] = (1, 5, 10),
                 map_ks: Sequence[int | None] = (10, 100, None), chunk_size: int | None = None,
                 code_prefixes: Sequence[int] = (), curves: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.measure, self.ks, self.map_ks, self.chunk_size = measure, tuple(ks), tuple(map_ks), chunk_size
        # curves: `compute` also keeps the full codes' curves (P@K, PR11, radius PR) in `last_curves`
        self.curves, self.last_curves = curves, {}
        if code_prefixes and (measure != "hamming" or any(p <= 0 or p % 8 for p in code_prefixes)):
            raise ValueError(f"code_prefixes {tuple(code_prefixes)} need hamming codes and multiples of 8 bits")
        self.code_prefixes = tuple(code_prefixes)
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_feats=None, image_ids=None, image_labels=None,
               text_feats=None, text_ids=None, text_image_ids=None) -> None:
        if image_feats is not None and len(image_feats):
            feats = self._stored_feats(image_feats)
            ids = as_tensor(image_ids, self.device).to(torch.int64).reshape(-1)
            if feats.shape[0] != ids.shape[0]:
                raise ValueError("image_feats and image_ids differ in length")
            self.image_feats.append(feats)
            self.image_ids.append(ids)
            if image_labels is not None:  # bool does not travel over gloo: uint8
                lab = as_tensor(image_labels, self.device).reshape(len(ids), -1)
                self.image_labels.append((lab != 0).to(torch.uint8))
        if text_feats is not None and len(text_feats):
            feats = self._stored_feats(text_feats)
            tids = as_tensor(text_ids, self.device).to(torch.int64).reshape(-1)
            timg = as_tensor(text_image_ids, self.device).to(torch.int64).reshape(-1)
            if not feats.shape[0] == tids.shape[0] == timg.shape[0]:
                raise ValueError("text_feats, text_ids and text_image_ids differ in length")
            self.text_feats.append(feats)
            self.text_ids.append(tids)
            self.text_image_ids.append(timg)

    def _stored_feats(self, feats) -> torch.Tensor:
        """Hash codes are kept packed (32x smaller than floats, and gloo-friendly)."""
        feats = as_tensor(feats, self.device).detach()
        if self.measure == "hamming" and feats.dtype != torch.uint8:
            feats = pack_codes(feats)
        return feats

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        self._add_missing_states(process_group)
        kwargs = {} if dist_sync_fn is None else {"dist_sync_fn": dist_sync_fn}
        super()._sync_dist(process_group=process_group, **kwargs)

    def _add_missing_states(self, process_group) -> None:
        """Give a rank that saw no data empty tensors of the right dtype and shape, and every stored
        tensor the trailing shape shared by all ranks (the largest: token states differ in length).

        torchmetrics pads a missing list state with a 1-D float32 tensor, which
        cannot be gathered together with other ranks' 2-D uint8 codes or int64 ids.
        """
        import torch.distributed as dist

        meta = torch.full((len(self._STATES), 4), -1, dtype=torch.int64, device=self.device)  # ndim, 2 dims, dtype
        for i, name in enumerate(self._STATES):
            tensors = _tensors(getattr(self, name))
            if tensors:
                meta[i, 0] = tensors[0].ndim
                for d in range(1, min(tensors[0].ndim, 3)):
                    meta[i, d] = max(t.shape[d] for t in tensors)
                meta[i, 3] = self._DTYPES.index(tensors[0].dtype)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=process_group)
        for i, name in enumerate(self._STATES):
            state = getattr(self, name)
            ndim, code = int(meta[i, 0]), int(meta[i, 3])
            if code < 0 or not isinstance(state, list):
                continue
            trailing = tuple(int(v) for v in meta[i, 1:ndim])
            if not state:
                state.append(torch.empty((0, *trailing), dtype=self._DTYPES[code], device=self.device))
            state[:] = [pad_trailing(t, trailing) for t in state]

    def _aligned(self):
        """(image positions, caption positions, caption -> image index, labels or None): the first copy
        of each id, ordered by id."""
        img_ids, txt_ids = _cat(self.image_ids), _cat(self.text_ids)
        if img_ids is None or txt_ids is None or not img_ids.numel() or not txt_ids.numel():
            raise ValueError("RetrievalMetrics.compute needs at least one image and one caption")
        img_keep, img_uids = first_by_id(img_ids)
        txt_keep, _ = first_by_id(txt_ids)
        txt_img = _cat(self.text_image_ids)[txt_keep]
        caption_image = torch.searchsorted(img_uids, txt_img).clamp_max(img_uids.numel() - 1)
        missing = img_uids[caption_image] != txt_img
        if bool(missing.any()):
            example = torch.unique(txt_img[missing])[:5].tolist()
            raise ValueError(f"{int(missing.sum())} caption(s) refer to images never seen, "
                             f"e.g. image ids {example}")
        labels = _cat(self.image_labels)
        if labels is not None and labels.numel():
            if labels.shape[0] != img_ids.shape[0]:
                raise ValueError("image_labels were given in some updates but not in others")
            labels = labels[img_keep]
        else:
            labels = None
        return img_keep, txt_keep, caption_image, labels

    def compute(self) -> dict[str, float]:
        img_keep, txt_keep, caption_image, labels = self._aligned()
        image, text = _cat(self.image_feats)[img_keep], _cat(self.text_feats)[txt_keep]
        if self.curves and labels is not None:
            results, self.last_curves = evaluate(image, text, caption_image, labels, measure=self.measure, ks=self.ks,
                                                 map_ks=self.map_ks, chunk_size=self.chunk_size, curves=True)
        else:
            results = self._evaluate(image, text, caption_image, labels)
        for bits in self.code_prefixes:
            prefix = self._evaluate(image[:, :bits // 8], text[:, :bits // 8], caption_image, labels)
            results.update({f"{bits}bit/{name}": value for name, value in prefix.items()})
        return results

    def _evaluate(self, image, text, caption_image, labels) -> dict[str, float]:
        return evaluate(image, text, caption_image, labels, measure=self.measure, ks=self.ks, map_ks=self.map_ks,
                        chunk_size=self.chunk_size)


def pad_trailing(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``t`` zero-padded at the end of its trailing dimensions up to ``shape`` (``t.shape[1:]``-sized)."""
    extra = [want - have for have, want in zip(t.shape[1:], shape)]
    if not any(extra):
        return t
    widths = [w for e in reversed(extra) for w in (0, e)]  # F.pad lists the last dimension first
    return torch.nn.functional.pad(t, widths)


def _tensors(state) -> list:
    if isinstance(state, torch.Tensor):
        return [state]
    return list(state)


def _cat(state):
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else None


def first_by_id(ids: torch.Tensor):
    """Positions of the first occurrence of each distinct id, ordered by id, and the ids."""
    uids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full_like(uids, ids.numel()).scatter_reduce_(0, inverse, pos, "amin")
    return first, uids
