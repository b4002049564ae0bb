"""The image-classification task: a vision transformer with heterogeneous-rank LoRA on its
attention and a classification head trained in full by every client (averaged by examples).

Images are resized once per run to ``image_size`` (uint8, shorter side then centre crop) and
normalised per batch with the model's image processor's mean and std; grey images are repeated
over the three colour channels. Each client wraps the one base model in a LoRA of its own rank
plus a trainable copy of the head, trains on its images (cross-entropy), and hands back its
factors and head. ``head_only`` is the baseline without LoRA: same head averaging, same steps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rblora.adapters import (
    BaseWeights,
    LoraHost,
    LoraSpec,
    applied_delta,
    dense_only,
    dense_parameters,
    keep_beside,
    read_dense,
    resolve_targets,
    save_peft_adapter,
    set_dense,
)
from rblora.aggregation.running import ModuleDelta
from rblora.aggregation.types import Factors
from rblora.protocol.types import ClientResult, ClientSpec, ClientStart, UpdateLayout
from rblora.tasks.base import (
    cached,
    check_client_sizes,
    check_ranks,
    seeded_subset,
    train_config,
)
from rblora.training import TrainConfig, train_local
from rblora.training.rank_pruning import RoundPruning
from rblora.utils.atomic import atomic_dir
from rblora.utils.device import use_bf16

DEFAULT_MODEL = "dinov2-vits14"
#: Resized client images an image task keeps between rounds (``ImageTask.pixel_cache_bytes``).
PIXEL_CACHE_BYTES = 2 << 30
HEAD = "classifier"
DENSE_FILE = "dense.safetensors"
# attention projections by architecture and transformers version: (query, value) leaf names
_ATTENTION_PAIRS = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("q_lin", "v_lin"))


def attention_targets(model: torch.nn.Module) -> list[str]:
    """The query and value projections of the model's attention (the seed's LoRA placement),
    whatever they are called; ValueError listing the linear layers if none is found."""
    leaves = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "attention" in name
    }
    for pair in _ATTENTION_PAIRS:
        if set(pair) <= leaves:
            return list(pair)
    raise ValueError(
        f"cannot tell the attention projections of {type(model).__name__} (linear layers under "
        f"'attention': {sorted(leaves)}); pass --lora_target_modules"
    )


class ImageTask:
    """Federated image classification (see :class:`rblora.tasks.base.Task`).

    Args:
        model: an image classifier with a linear ``classifier`` head (held for the whole run).
        preprocessing: ``{"mean", "std"}`` of the model's image processor.
        clients: client id -> its :class:`rblora.data.federated.ImageSplit`, for the clients this
            process trains (all in-process, one on a Flower node, none on a Flower server); a
            :class:`rblora.data.federated.ClientImages` reads each when it first trains.
        test: the test set's ImageSplit (None: no evaluation here, as on a Flower node).
        classes: the class names (the head's outputs, in order).
        image_size: pixels a side the images are resized to.
        train_config: local training options; its seed is replaced per client and round.
        target_modules, lora_dropout: LoRA placement and dropout (ignored with ``head_only``).
        head_only: train only the head (the baseline without LoRA).
        pixel_cache_bytes: resized client images kept between rounds, least recently trained
            dropped first (the clients of a 10-client run stay; of 10,000 clients of 224 px
            colour images, 9 GB, what fits).
    """

    modules_to_save = [HEAD]

    def __init__(
        self,
        model: torch.nn.Module,
        preprocessing: dict,
        clients: dict,
        test,
        *,
        classes: list[str],
        image_size: int,
        train_config: TrainConfig,
        target_modules: list[str],
        lora_dropout: float,
        head_only: bool = False,
        eval_batch_size: int = 64,
        base_reference: str = "",
        progress: bool = True,
        pixel_cache_bytes: int = PIXEL_CACHE_BYTES,
    ):
        self.model = model
        self.classes = list(classes)
        self.image_size = image_size
        self.train_config = train_config
        self.target_modules = list(target_modules)
        self.lora_dropout = lora_dropout
        self.head_only = head_only
        self.eval_batch_size = eval_batch_size
        self.base_reference = base_reference
        self.progress = progress
        self._mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self._base = BaseWeights.of(model)
        self._lora = LoraHost.of(model)  # attaches clients' LoRAs without rebuilding PEFT
        # global updates stay beside the weights unless the model computes in float32
        self._merged = not keep_beside(model, use_bf16(train_config.bf16, model))
        self._clients = clients
        known = getattr(clients, "sizes", None)  # a ClientImages knows them without reading
        self._sizes = dict(known) if known is not None else {k: len(c) for k, c in clients.items()}
        self.pixel_cache_bytes = pixel_cache_bytes
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._test_pixels = None if test is None else test.pixels(image_size)
        self._test_labels = None if test is None else torch.as_tensor(test.labels).long()
        self._test_ids = None  # the test images' ids (outcomes.image_item_ids), when first used
        self.local_tests = None
        """``client -> its own held-out ImageSplit`` (None when it holds none out), read when
        asked (set by :meth:`from_args`; None: no client's held-out split is known)."""
        spec = LoraSpec(rank=1, target_modules=self.target_modules)
        self._shapes = {n: (o, i) for n, (i, o) in resolve_targets(model, spec).items()}

    @classmethod
    def from_args(
        cls,
        args,
        *,
        log=print,
        clients: list[int],
        evaluation: bool = True,
        models: dict | None = None,
    ) -> ImageTask:
        """Build the task of a run: the images of ``clients`` (and the test set when
        ``evaluation``) read and resized, model loaded with a head for the data's classes on its
        device, LoRA targets found, ranks checked. See ``rblora.tasks.build_task``."""
        from rblora.assets.models import load_image_classifier, model_reference
        from rblora.data import open_client_images
        from rblora.utils.device import resolve_base_dtype, resolve_device

        if not clients and not evaluation:
            raise ValueError("an image task needs a client's images or the test set")
        splits, reader = open_client_images(args.data_path, args.num_clients, clients)
        check_client_sizes(args, splits.sizes)
        test = reader.split("global_test.json", None) if evaluation else None
        classes = list(splits.classes if clients else test.classes)
        device = resolve_device(args.device)
        dtype = resolve_base_dtype(args.base_dtype, device)
        name = args.global_model or DEFAULT_MODEL
        log(
            f"loading {name} on {device} in {str(dtype).removeprefix('torch.')} with a "
            f"{len(classes)}-class head"
        )
        model, preprocessing = cached(
            models,
            ("image", name, str(device), str(dtype), len(classes), args.seed),
            lambda: load_image_classifier(
                name, len(classes), seed=args.seed, device=device, dtype=dtype,
                token=args.hf_token(),
            ),
        )  # fmt: skip
        config = train_config(args, model, log=log)
        probe = _take(test if test is not None else splits[clients[0]], [0])  # through the model
        if test is not None and args.eval_test_size and args.eval_test_size < len(test):
            keep = seeded_subset(list(range(len(test))), args.eval_test_size, args.seed)
            test = _take(test, keep)
        size = args.image_size or preprocessing["size"]
        total = sum(splits.sizes.values())
        log(f"images resized to {size} px: {len(test) if test is not None else 0} test images now, "
            f"{total} training images of {len(splits)} clients when each first trains")  # fmt: skip
        task = cls(
            model,
            preprocessing,
            splits,
            test,
            classes=classes,
            image_size=size,
            train_config=config,
            target_modules=args.lora_target_modules or attention_targets(model),
            lora_dropout=args.lora_dropout,
            head_only=args.head_only,
            eval_batch_size=args.eval_batch_size,
            base_reference=model_reference(name),
            progress=args.progress,
        )
        if not args.head_only:
            check_ranks(args.ranks(), task.module_shapes())
        task.check_forward(probe.pixels(size))
        task.local_tests = reader.local_test
        return task

    def check_forward(self, pixels: torch.Tensor) -> None:
        """One image through the model, so a size it cannot take fails before round 1."""
        try:
            with torch.no_grad():
                self.model(pixel_values=self.inputs(pixels).to(self._device()))
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"the model cannot classify {self.image_size} px images ({err}); set "
                "--image_size to a size it takes"
            ) from None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ inputs and loss
    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(b, C, S, S)`` -> normalised float ``(b, 3, S, S)``."""
        x = pixels.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self._mean) / self._std

    def _client_tensors(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``client``'s images resized (uint8 ``(n, C, S, S)``) and labels ``(n,)``:
        read and resized when it first trains, then kept within ``pixel_cache_bytes``."""
        if client in self._cache:
            self._cache.move_to_end(client)
            return self._cache[client]
        split = self._clients[client]
        if len(split) != self._sizes[client]:
            raise ValueError(
                f"client {client} holds {len(split)} images, but the run counts "
                f"{self._sizes[client]}: its data changed since the run started"
            )
        tensors = split.pixels(self.image_size), torch.as_tensor(split.labels, dtype=torch.long)
        self._cache[client] = tensors
        used = sum(p.numel() * p.element_size() + y.numel() * 8 for p, y in self._cache.values())
        while len(self._cache) > 1 and used > self.pixel_cache_bytes:
            pixels, labels = self._cache.popitem(last=False)[1]
            used -= pixels.numel() * pixels.element_size() + labels.numel() * 8
        return tensors

    def _loss_fn(self, client: int):
        pixels, labels = self._client_tensors(client)

        def loss_fn(model, batch) -> tuple[torch.Tensor, int]:
            device = next(model.parameters()).device
            idx = torch.as_tensor(batch, dtype=torch.long)
            logits = model(pixel_values=self.inputs(pixels[idx]).to(device)).logits.float()
            return F.cross_entropy(logits, labels[idx].to(device), reduction="sum"), len(batch)

        return loss_fn

    # ------------------------------------------------------------------ Task protocol
    def num_examples(self, client_id: int) -> int:
        if client_id not in self._sizes:
            raise ValueError(
                f"client {client_id}'s images are not held here (this task holds clients "
                f"{sorted(self._sizes)})"
            )
        return self._sizes[client_id]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def update_layout(self) -> UpdateLayout:
        head = dense_parameters(self.model, self.modules_to_save)
        return UpdateLayout(
            modules={} if self.head_only else self.module_shapes(),
            dense={name: tuple(t.shape) for name, t in head.items()},
        )

    def train_client(
        self, spec: ClientSpec, start: ClientStart, *, seed: int, round_: int
    ) -> ClientResult:
        k = spec.client_id
        config = replace(self.train_config, seed=seed)
        dense = start.dense or None
        examples = list(range(self.num_examples(k)))
        if self.head_only:
            with dense_only(self.model, self.modules_to_save, dense) as model:
                result = train_local(
                    model, examples, config, loss_fn=self._loss_fn(k), progress=self.progress
                )
                factors, trained = {}, read_dense(model, self.modules_to_save)
        else:
            lora = LoraSpec(
                rank=spec.rank,
                lora_alpha=spec.lora_alpha,
                target_modules=self.target_modules,
                dropout=self.lora_dropout,
                use_rslora=spec.use_rslora,
                modules_to_save=self.modules_to_save,
            )
            peft_model = self._lora.attach(
                lora, init=start.factors, dense=dense, seed=seed, trains=start.trains
            )
            try:
                pruning = RoundPruning.begin(peft_model, config.prune_lambda, config.prune_gamma)
                result = train_local(
                    peft_model, examples, config, loss_fn=self._loss_fn(k), progress=self.progress,
                    penalty=pruning.penalty if pruning else None,
                )  # fmt: skip
                factors, trained = self._lora.read_factors(), self._lora.read_dense()
                if pruning:
                    factors = pruning.finish(peft_model, factors, spec.scale)
            finally:
                self.model = self._lora.detach()
        metrics = {
            "loss": result.loss,
            "steps": result.steps,
            "images": len(examples) * config.num_epochs,
            "seconds": round(result.seconds, 3),
        }
        return ClientResult(factors, len(examples), dense=trained, metrics=metrics)

    def set_base(self, delta: dict[str, ModuleDelta], dense: dict[str, torch.Tensor]) -> None:
        self._base.set(delta, merged=self._merged)
        if dense:
            set_dense(self.model, dense)

    def evaluate(self, delta: dict[str, ModuleDelta], *, round_: int) -> dict[str, Any]:
        from rblora.evaluation.classification import evaluate_classifier
        from rblora.evaluation.outcomes import image_item_ids

        if self._test_pixels is None:
            raise ValueError("this task holds no test set (built with evaluation=False)")

        if self._test_ids is None:
            self._test_ids = image_item_ids(self._test_pixels, self._test_labels)
        with applied_delta(self.model, delta, merged=self._merged):
            return evaluate_classifier(
                self.model,
                lambda idx: self.inputs(self._test_pixels[idx]),
                self._test_labels,
                self.classes,
                batch_size=self.eval_batch_size,
                autocast_bf16=use_bf16(self.train_config.bf16, self.model),
                ids=self._test_ids,
            )

    def evaluate_local(
        self, client_id: int, delta: dict[str, ModuleDelta], *, round_: int
    ) -> dict[str, Any] | None:
        """Metrics of the base + ``delta`` on client ``client_id``'s own held-out images
        (``local_test_<k>.json``), with the global evaluation's code, as the suite ``local``;
        None when the client holds none out. ``"examples"``: the held-out images scored. Read
        and resized when asked, never kept."""
        from rblora.evaluation.classification import evaluate_classifier

        self.num_examples(client_id)  # this task holds the client, or ValueError
        if self.local_tests is None:
            raise ValueError("this task knows no client's held-out split (built without a folder)")
        split = self.local_tests(client_id)
        if split is None:
            return None
        pixels, labels = split.pixels(self.image_size), torch.as_tensor(split.labels).long()
        with applied_delta(self.model, delta, merged=self._merged):
            evaluation = evaluate_classifier(
                self.model,
                lambda idx: self.inputs(pixels[idx]),
                labels,
                self.classes,
                batch_size=self.eval_batch_size,
                autocast_bf16=use_bf16(self.train_config.bf16, self.model),
                suite="local",
            )
        return {**evaluation, "examples": len(labels)}

    def save_adapter(
        self,
        path: Path,
        factors: Factors,
        dense: dict[str, torch.Tensor],
        *,
        rank: int,
        lora_alpha: float,
        use_rslora: bool,
    ) -> None:
        if not factors:  # head only: no LoRA, so no PEFT folder; the head's weights alone
            with atomic_dir(path) as tmp:
                tensors = {n: t.detach().to("cpu").contiguous() for n, t in dense.items()}
                save_file(tensors, str(tmp / DENSE_FILE), metadata={"format": "pt"})
            return
        save_peft_adapter(
            path,
            factors,
            rank=rank,
            lora_alpha=lora_alpha,
            target_modules=self.target_modules,
            use_rslora=use_rslora,
            base_model_name_or_path=self.base_reference,
            task_type=None,
            dense=dense,
            modules_to_save=self.modules_to_save if dense else None,
        )


def _take(split, keep: list[int]):
    """The examples ``keep`` of an ImageSplit."""
    from rblora.data.federated import ImageSplit

    idx = torch.as_tensor(keep, dtype=torch.long)
    images = (
        [split.images[i] for i in keep] if isinstance(split.images, list) else split.images[idx]
    )
    return ImageSplit(images, torch.as_tensor(split.labels)[idx], split.classes)
