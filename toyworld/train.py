"""Train the toy Stable-Diffusion-shaped model on the toy world, stage by stage, resumably.

    python -m toyworld.train vae         # 1. the autoencoder, on freshly rendered images
    python -m toyworld.train vae --decoder-only   # (any time later) improve the decoder; latents stay valid
    python -m toyworld.train latents     # 2. encode a fixed set of world images once (the VAE is frozen now)
    python -m toyworld.train unet        # 3. UNet + text encoder on the cached latents, captions dropped 10%
    python -m toyworld.train export      # write the current weights to assets/toy-sd (diffusers layout)
    python -m toyworld.train classifier  # the attribute classifier (evaluation), saved to assets/toy-classifier
    python -m toyworld.train clip        # the toy CLIP (evaluation), saved to assets/toy-clip
    python -m toyworld.train compact     # shrink unet.pt and vae.pt (fp16 EMA, bf16 moments) to carry them in git

Each training stage keeps one checkpoint, `<checkpoints>/<stage>.pt`, written atomically every
`--save-minutes` and at the end, with the model, its EMA (UNet stage), the optimiser state and the step. Running
the same command again resumes from it exactly: batches and noise are pure functions of `(seed, step)`, so a
resumed run draws what an uninterrupted one would have. `--steps` is the total to reach; `--minutes` stops
early (after a checkpoint). Scripts print progress; the library modules log.

The UNet is trained as in Stable Diffusion (epsilon prediction, SD's scaled-linear noise schedule, classifier-
free guidance by dropping 10% of captions to "") with Min-SNR-5 loss weights (Hang et al. 2023) to learn faster,
and offset noise (see NOISE_OFFSET) so that backgrounds follow the text.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toyworld.loop import (Progress, cosine, images_tensor, load_checkpoint, optimise, save_atomic, scenes_tensor,
                           step_generator)
from toyworld.world import World, caption, described

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
UNET_LR = 1e-3  # peak learning rate of the UNet stage (after 500 warm-up steps)
CAPTION_DROPOUT = 0.1  # fraction of captions replaced by "" (classifier-free guidance)
# Offset noise (Guttenberg 2023): a per-sample, per-channel constant added to the training noise. SD's schedule
# leaves sqrt(alpha_bar_999) = 0.068 of the signal at t = 999; on a 16x16 latent the spatial mean of pure noise
# has std 1/16, so the mean of x_999 still reveals the background colour and the model learns to read it there
# instead of from the text (measured: its t = 999 prediction kept the seed's colour for every background word).
# An offset of std 0.3 hides the mean, so the text must set the background; inference is unchanged.
NOISE_OFFSET = 0.3


# ------------------------------------------------------------------------------------------------- 1. VAE

def vae_loss(recon: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, kl_weight: float,
             detail: float = 0.0) -> torch.Tensor:
    """Colour-aware reconstruction loss: L1 + MSE on pixels with object pixels (those unlike the background,
    read at the corner, which objects never cover) weighted 5x, and pixels unlike their 3x3 neighbourhood (dots,
    stripes, checks: where a second colour lives) weighted `detail` more, an L1 on 4x4-pooled colours so flat
    colours are kept exactly, an L1 on horizontal and vertical pixel differences so edges, dots and the blocks of
    pixelated images stay sharp, and a small KL."""
    background = target[:, :, :1, :1]
    weight = 1 + 4 * ((target - background).abs().sum(dim=1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
    if detail:
        local = F.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
        weight = weight + detail * ((target - local).abs().sum(dim=1, keepdim=True) > 0.15).float()
    error = recon - target
    pixels = (weight * (error.abs() + error ** 2)).mean() / weight.mean()
    pooled = F.l1_loss(F.avg_pool2d(recon, 4), F.avg_pool2d(target, 4))
    edges = sum(F.l1_loss(recon.diff(dim=d), target.diff(dim=d)) for d in (2, 3))
    return pixels + 2 * pooled + edges + kl_weight * kl.mean()


def train_vae(args) -> None:
    from toyworld.model import build_vae_toy

    path = args.checkpoints / "vae.pt"
    torch.manual_seed(args.seed)
    vae = build_vae_toy()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr or 1e-3, weight_decay=0.0)
    state, step = load_checkpoint(path), 0
    if state:
        vae.load_state_dict(state["vae"]), optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resuming the VAE at step {step}")
    elif args.decoder_only or args.pin:  # no checkpoint carried over: the exported VAE defines the latent space
        vae.load_state_dict(load_vae(args.checkpoints).state_dict())
        print("starting from the exported VAE (no vae.pt); a fresh optimiser")
    if args.decoder_only:  # the latent space (and so any UNet trained on it) stays fixed
        vae.encoder.requires_grad_(False), vae.quant_conv.requires_grad_(False)
        print("training the decoder only: the encoder is frozen")
    pinned = pinned_encoder(args) if args.pin else None
    world, progress = World(args.seed, unnamed=args.unnamed), Progress(args.save_minutes, args.minutes)

    def save() -> None:
        save_atomic(dict(vae=vae.state_dict(), optimizer=optimizer.state_dict(), step=step, batch=args.batch,
                         seed=args.seed, unnamed=args.unnamed, pin=args.pin, detail=args.detail), path)

    vae.train()
    peak = args.lr or 1e-3
    while step < args.steps and not progress.out_of_time():
        if args.anneal_from is not None and step >= args.anneal_from:  # cosine to 0 at --steps
            span = max(1, args.steps - args.anneal_from)
            for group in optimizer.param_groups:
                group["lr"] = peak * cosine(step - args.anneal_from, span)
        scenes = [world.scene(i) for i in range(step * args.batch, (step + 1) * args.batch)]
        x = scenes_tensor(scenes)
        with torch.set_grad_enabled(not args.decoder_only):
            posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=step_generator(args.seed, step))
        loss = vae_loss(vae.decode(z).sample, x, posterior.kl(), kl_weight=1e-6, detail=args.detail)
        if pinned is not None:
            loss = loss + args.pin * pin_loss(pinned, x, posterior.mean, [s.named for s in scenes])
        optimise(optimizer, loss, [p for p in vae.parameters() if p.requires_grad])
        step += 1
        progress.after_step(f"vae step {step} loss {loss.item():.4f}", save)
    progress.close()
    save()
    print(f"VAE at step {step}, saved to {path}")


def pinned_encoder(args):
    """The starting VAE, frozen, with its latent scaling factor: the latent space a widened VAE must keep."""
    reference = load_vae(args.checkpoints).eval().requires_grad_(False)
    from toyworld.model import TOY_SD_PATH

    config = TOY_SD_PATH / "vae" / "config.json"
    scaling = json.loads(config.read_text())["scaling_factor"] if config.exists() else 1.0
    return reference, scaling


def pin_loss(pinned, x: torch.Tensor, means: torch.Tensor, named: list[bool]) -> torch.Tensor:
    """Mean squared distance, in units of the latents' standard deviation, between the new encoder's posterior
    means of named images and the pinned encoder's, so that a UNet trained on the old latents stays valid while
    the VAE learns the unnamed attributes (those images are not pinned: their old latents are the problem)."""
    reference, scaling = pinned
    keep = torch.tensor(named)
    if not keep.any():
        return means.sum() * 0
    with torch.no_grad():
        old = reference.encode(x[keep]).latent_dist.mean
    return F.mse_loss(means[keep] * scaling, old * scaling)


# ------------------------------------------------------------------------------------------ 2. latent cache

def load_vae(checkpoints: Path):
    """The VAE stage's weights, or (when only the UNet checkpoint was carried over) the exported VAE."""
    from diffusers import AutoencoderKL

    from toyworld.model import TOY_SD_PATH, build_vae_toy

    state = load_checkpoint(checkpoints / "vae.pt")
    if state is not None:
        vae = build_vae_toy()
        vae.load_state_dict(state["vae"])
        return vae
    if (TOY_SD_PATH / "vae").exists():
        print(f"no {checkpoints / 'vae.pt'}: using the exported VAE in {TOY_SD_PATH / 'vae'}")
        return AutoencoderKL.from_pretrained(TOY_SD_PATH / "vae")
    raise SystemExit(f"no VAE in {checkpoints}: run `python -m toyworld.train vae` first")


@torch.no_grad()
def encode_latents(args) -> None:
    """Encode world images 0..count-1 with the frozen VAE (posterior means), and fix the latent scaling factor."""
    vae = load_vae(args.checkpoints).eval()
    world, latents, start = World(args.seed, unnamed=args.unnamed), [], time.time()
    for first in range(0, args.count, 256):
        indices = range(first, min(first + 256, args.count))
        latents.append(vae.encode(images_tensor(world, indices)).latent_dist.mean.half())
        print(f"encoded {first + len(indices)}/{args.count} ({time.time() - start:.0f} s)", flush=True)
    latents = torch.cat(latents)  # (N, 4, 16, 16)
    scaling_factor = float(1 / latents.float().std())
    save_atomic(dict(latents=latents, scaling_factor=scaling_factor, seed=args.seed, unnamed=args.unnamed),
                args.checkpoints / "latents.pt")
    print(f"{len(latents)} latents, std {1 / scaling_factor:.3f}: scaling factor {scaling_factor:.4f}")


# ------------------------------------------------------------------------------------- 3. UNet + text encoder

class CaptionedLatents:
    """Epoch-shuffled (latent, caption) batches that are a pure function of (seed, step).

    A caption is given as token ids and weights, both (B, S, K): position s of sample b is the weighted blend of
    the K tokens' input embeddings (`blend_embeddings`); a plain word is one token of weight 1. With
    `blend_share > 0`, unnamed values are said by their blends and, with `compound_share`, descriptors merge into
    one position (`toyworld.world.described`); with both 0 the ids are the tokenizer's and K = 1."""

    def __init__(self, latents: torch.Tensor, world: World, tokenizer, drop: float, seed: int, colour_drop: float = 0.0,
                 blend_share: float = 0.0, compound_share: float = 0.0):
        self.latents, self.world, self.tokenizer, self.drop, self.seed = latents, world, tokenizer, drop, seed
        self.colour_drop = colour_drop  # share of captions without the object's colour word
        self.blend_share, self.compound_share = blend_share, compound_share
        self.scenes = [world.scene(i) for i in range(len(latents))]
        self.permutations: dict[int, torch.Tensor] = {}
        self.pieces: dict[str, list[int]] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self.permutations:
            self.permutations = {epoch: torch.randperm(len(self.latents), generator=step_generator(self.seed, epoch, 1))}
        return self.permutations[epoch]

    def words(self, k: int, index: int) -> list:
        """Sample k's caption as words and blends (empty for a dropped caption)."""
        rng = np.random.default_rng([self.seed, k, 2])
        with_colour = np.random.default_rng([self.seed, k, 4]).random() >= self.colour_drop  # its own stream
        if rng.random() < self.drop:
            return []
        if not (self.blend_share or self.compound_share):
            return caption(self.scenes[index], rng, with_colour).split()
        return described(self.scenes[index], rng, with_colour, self.blend_share, self.compound_share)

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (B, C, H, W), token ids and weights (B, S, K)."""
        n = len(self.latents)
        ks = range(step * size, (step + 1) * size)
        indices = torch.stack([self.permutation(k // n)[k % n] for k in ks])
        ids, weights = blended_ids(self.tokenizer, [self.words(k, i) for k, i in zip(ks, indices.tolist())],
                                   self.pieces)
        return self.latents[indices].float(), ids, weights


def blended_ids(tokenizer, captions: list[list], pieces: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and weights (B, S, K) of captions given as words and blends (`toyworld.world.described`), padded
    and truncated as the tokenizer does (start, words, end, padding). A word's pieces each take a position; a
    blend is one position holding all its words' pieces, a word's weight split evenly over its pieces."""
    pieces = {} if pieces is None else pieces  # word -> token ids, a cache

    def token_ids(word: str) -> list[int]:
        if word not in pieces:
            pieces[word] = tokenizer(word, add_special_tokens=False).input_ids
        return pieces[word]

    rows, n = [], tokenizer.model_max_length
    for words in captions:
        row = [[(tokenizer.bos_token_id, 1.0)]]
        for word in words:
            if isinstance(word, str):
                row += [[(i, 1.0)] for i in token_ids(word)]
            else:
                row.append([(i, w / len(token_ids(part))) for part, w in word for i in token_ids(part)])
        row = row[:n - 1] + [[(tokenizer.eos_token_id, 1.0)]]
        rows.append(row + [[(tokenizer.pad_token_id, 1.0)]] * (n - len(row)))
    ids = torch.full((len(rows), n, max(len(p) for r in rows for p in r)), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.zeros(ids.shape)
    for b, row in enumerate(rows):
        for s, position in enumerate(row):
            for j, (i, w) in enumerate(position):
                ids[b, s, j], weights[b, s, j] = i, w
    return ids, weights


def blend_embeddings(token_embedding: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Input embeddings (B, S, D) for blended positions: the weighted sum of the tokens' rows, rescaled to the
    weighted mean of their norms (a blend of words is as long as a word; a single token is its own row)."""
    rows = token_embedding(ids)  # (B, S, K, D)
    mixed = (weights.unsqueeze(-1) * rows).sum(dim=-2)
    target = (weights * rows.norm(dim=-1)).sum(dim=-1, keepdim=True)
    return mixed * (target / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def encode_blended(text_encoder: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The text encoder's output (B, S, D) for blended captions; equals `text_encoder(ids)[0]` when K = 1."""
    from neti.conditioning import text_transformer

    parts = getattr(text_encoder, "text_model", text_encoder)
    embeds = blend_embeddings(parts.embeddings.token_embedding, ids, weights)
    return parts.final_layer_norm(text_transformer(text_encoder, embeds))


def clip_text_weights(folder: Path, tokenizer) -> dict:
    """The text tower of a saved `CLIPModel` as a `CLIPTextModel` state dict for `tokenizer`'s vocabulary (the
    CLIP's may hold more words: the judges know the unnamed attributes, the generator does not)."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    state = load_file(Path(folder) / "model.safetensors")
    text = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")}
    return moved_to_vocabulary(text, CLIPTokenizer.from_pretrained(str(folder)).get_vocab(), tokenizer)


TOKEN_EMBEDDINGS = "embeddings.token_embedding.weight"  # in a CLIPTextModel state dict


def moved_to_vocabulary(state: dict, old_vocab: dict[str, int], tokenizer) -> dict:
    """A text-encoder state dict whose token embeddings are moved from `old_vocab`'s ids to `tokenizer`'s, by
    token string (the new vocabulary may lack words the old one had, such as the unnamed attributes')."""
    rows = state[TOKEN_EMBEDDINGS]
    new_vocab = tokenizer.get_vocab()
    moved = rows.new_zeros(len(new_vocab), rows.shape[1])
    for token, i in new_vocab.items():
        moved[i] = rows[old_vocab[token]]  # every token of the new vocabulary is in the old one
    return {**state, TOKEN_EMBEDDINGS: moved}


def exported_text_and_unet(tokenizer, text_encoder, unet) -> float:
    """Load the exported UNet and text encoder (`assets/toy-sd`) into fresh modules, the text encoder's token
    embeddings moved to `tokenizer`'s ids; returns the export's latent scaling factor, which a continued run
    keeps."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from toyworld.model import TOY_SD_PATH

    old_vocab = CLIPTokenizer.from_pretrained(TOY_SD_PATH / "tokenizer").get_vocab()
    old = CLIPTextModel.from_pretrained(TOY_SD_PATH / "text_encoder").state_dict()
    text_encoder.load_state_dict(moved_to_vocabulary(old, old_vocab, tokenizer))
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(TOY_SD_PATH / "unet").state_dict())
    return json.loads((TOY_SD_PATH / "vae" / "config.json").read_text())["scaling_factor"]


def exported_training_record() -> str | None:
    """The export's `training.json` as text (a run that continues it records what it continued)."""
    from toyworld.model import TOY_SD_PATH

    record = TOY_SD_PATH / "training.json"
    return record.read_text() if record.exists() else None


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023, Eq. 9)."""
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(args) -> None:
    from diffusers import DDPMScheduler

    from toyworld.model import build_components
    from neti.testing.sd_layout import SD_SCHEDULER_CONFIG

    path = args.checkpoints / "unet.pt"
    cache = load_checkpoint(args.checkpoints / "latents.pt")
    if cache is None:
        raise SystemExit(f"no latent cache in {args.checkpoints}: run `python -m toyworld.train latents` first")
    parts = build_components(seed=args.seed)
    tokenizer, text_encoder, unet = parts["tokenizer"], parts["text_encoder"], parts["unet"]
    ema_text_encoder, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr or UNET_LR, weight_decay=0.01)
    state, step = load_checkpoint(path), 0
    if state:
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"),
                            (ema_text_encoder, "ema_text_encoder")):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resuming the UNet at step {step} ({step * state['batch']} samples), noise offset {args.noise_offset}")
    scaling = state["scaling_factor"] if state else cache["scaling_factor"]
    continued_from = state.get("continued_from") if state else None
    if not state and args.from_export:  # continue the exported model (a fresh optimiser) on new data
        scaling = exported_text_and_unet(tokenizer, text_encoder, unet)
        ema_text_encoder.load_state_dict(text_encoder.state_dict()), ema_unet.load_state_dict(unet.state_dict())
        continued_from = exported_training_record()
        print(f"continuing the exported UNet and text encoder; latent scaling factor kept at {scaling:.4f}")
    elif not state and args.text_init:  # as Stable Diffusion starts from CLIP's text encoder, start from the toy CLIP's
        text_encoder.load_state_dict(clip_text_weights(args.text_init, tokenizer))
        ema_text_encoder.load_state_dict(text_encoder.state_dict())
        print(f"text encoder initialised from the CLIP text tower in {args.text_init}")
    data = CaptionedLatents(cache["latents"], World(cache["seed"], unnamed=cache.get("unnamed", 0.0)), tokenizer,
                            drop=CAPTION_DROPOUT, seed=args.seed, colour_drop=args.colour_dropout,
                            blend_share=args.blend_share, compound_share=args.compound_share)
    scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    warmup = 500
    progress, start_step, losses = Progress(args.save_minutes, args.minutes), step, []

    def save() -> None:
        save_atomic(dict(unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                         ema_text_encoder=ema_text_encoder.state_dict(), optimizer=optimizer.state_dict(), step=step,
                         batch=args.batch, seed=args.seed, scaling_factor=scaling,
                         noise_offset=args.noise_offset, colour_dropout=args.colour_dropout,
                         blend_share=args.blend_share, compound_share=args.compound_share,
                         **({"continued_from": continued_from} if continued_from else {})), path)

    unet.train(), text_encoder.train()
    while step < args.steps and not progress.out_of_time():
        for group in optimizer.param_groups:
            group["lr"] = (args.lr or UNET_LR) * min(1.0, (step + 1) / warmup)
        latents, ids, weights = data.batch(step, args.batch)
        x0 = latents * scaling
        generator = step_generator(args.seed, step)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn(*x0.shape[:2], 1, 1, generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encode_blended(text_encoder, ids, weights)).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (min_snr_weights(scheduler, t) * per_sample).mean()
        optimise(optimizer, loss, params)
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text_encoder, text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        rate = (step - start_step) * args.batch / (time.time() - progress.start)
        progress.after_step(f"unet step {step} samples {step * args.batch} loss {np.mean(losses[-100:]):.4f} "
                            f"{rate:.1f} samples/s", save)
    progress.close()
    save()
    print(f"UNet at step {step} ({step * args.batch} samples), saved to {path}")


# ------------------------------------------------------------------------------------------------ export

def export(args) -> None:
    """Write the VAE and the UNet stage's EMA weights as a `StableDiffusionPipeline` folder."""
    from toyworld.model import build_components, save_pipeline

    parts = build_components(seed=args.seed)
    vae, unet_state = load_vae(args.checkpoints), load_checkpoint(args.checkpoints / "unet.pt")
    if unet_state is None:
        raise SystemExit(f"no UNet checkpoint in {args.checkpoints}: run `python -m toyworld.train unet` first")
    vae.register_to_config(scaling_factor=unet_state["scaling_factor"])
    parts["unet"].load_state_dict(unet_state["ema_unet"])
    parts["text_encoder"].load_state_dict(unet_state["ema_text_encoder"])
    out = save_pipeline(args.out, parts["tokenizer"], parts["text_encoder"], parts["unet"], vae)
    vae_state = load_checkpoint(args.checkpoints / "vae.pt")
    info = dict(unet_step=unet_state["step"], samples=unet_state["step"] * unet_state["batch"],
                vae_step=vae_state["step"] if vae_state else None,
                exported=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for key in ("colour_dropout", "blend_share", "compound_share"):  # the caption recipe of the last run
        if unet_state.get(key):
            info[key] = unet_state[key]
    if vae_state and any(vae_state.get(k) for k in ("unnamed", "pin", "detail")):  # the VAE run's recipe
        info["vae"] = {k: vae_state[k] for k in ("unnamed", "pin", "detail") if vae_state.get(k)}
    if unet_state.get("continued_from"):  # a fine-tune of an earlier export: keep its record
        info["continued_from"] = json.loads(unet_state["continued_from"])
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"exported step {info['unet_step']} ({info['samples']} samples) to {out}")


def compact(args) -> None:
    """Shrink `unet.pt` and `vae.pt` for carrying them across sessions in git: EMA weights in fp16 and AdamW's
    moments in bf16 (the live weights stay fp32). Resuming casts them back (`load_state_dict` copies into fp32
    tensors and `Optimizer.load_state_dict` casts state to the parameters' dtype); the run continues within
    rounding."""
    found = False
    for name, emas in (("unet.pt", ("ema_unet", "ema_text_encoder")), ("vae.pt", ())):
        path = args.checkpoints / name
        state = load_checkpoint(path)
        if state is None:
            continue
        found, before = True, path.stat().st_size
        for key in emas:
            state[key] = {k: v.half() if v.is_floating_point() else v for k, v in state[key].items()}
        for param_state in state["optimizer"]["state"].values():
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in param_state:
                    param_state[moment] = param_state[moment].to(torch.bfloat16)
        save_atomic(state, path)
        print(f"{path}: {before / 1e6:.1f} MB -> {path.stat().st_size / 1e6:.1f} MB (step {state['step']})")
    if not found:
        raise SystemExit(f"no UNet or VAE checkpoint in {args.checkpoints}")


# -------------------------------------------------------------------------------------------------- CLI

DEFAULTS = dict(vae=dict(steps=2000, batch=16), latents=dict(steps=0, batch=0), unet=dict(steps=100000, batch=48),
                classifier=dict(steps=1500, batch=64), clip=dict(steps=2500, batch=128), export=dict(steps=0, batch=0),
                compact=dict(steps=0, batch=0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(DEFAULTS))
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="where stage checkpoints live")
    parser.add_argument("--steps", type=int, help="total optimiser steps to reach (stage default otherwise)")
    parser.add_argument("--batch", type=int, help="batch size (changing it mid-run changes the data order)")
    parser.add_argument("--lr", type=float, help="peak learning rate (stage default otherwise)")
    parser.add_argument("--minutes", type=float, help="stop (after saving) when this much wall time has passed")
    parser.add_argument("--save-minutes", type=float, default=5.0, help="checkpoint interval")
    parser.add_argument("--seed", type=int, default=0, help="the world's and the initialisation's seed")
    parser.add_argument("--count", type=int, default=40000, help="latents stage: how many world images to encode")
    parser.add_argument("--decoder-only", action="store_true",
                        help="vae stage: freeze the encoder, so cached latents and the UNet stay valid")
    parser.add_argument("--unnamed", type=float, default=0.0,
                        help="vae/latents/unet/classifier/clip: the world's probability, per attribute, of an unnamed "
                             "value (a heart, pink, checks, a second colour), drawn but never captioned")
    parser.add_argument("--pin", type=float, default=0.0,
                        help="vae stage: weight of a loss that keeps named images' latents where the starting VAE "
                             "put them (start from the export), so the UNet can continue on the new VAE")
    parser.add_argument("--detail", type=float, default=0.0,
                        help="vae stage: extra loss weight of pixels unlike their neighbours (a pattern's second "
                             "colour lives there)")
    parser.add_argument("--anneal-from", type=int,
                        help="vae stage: from this step on, the learning rate follows a cosine from --lr to 0 at --steps")
    parser.add_argument("--noise-offset", type=float, default=NOISE_OFFSET,
                        help="UNet stage: std of the per-channel offset added to the training noise (0: none)")
    parser.add_argument("--colour-dropout", type=float, default=0.0,
                        help="UNet stage: share of captions without the object's colour word, so that a prompt "
                             "like 'a <concept> on a red background' reads red as the background")
    parser.add_argument("--blend-share", type=float, default=0.0,
                        help="UNet stage: probability that a caption says an unnamed value by its blend of two "
                             "named words' embeddings (toyworld.world.BLENDS) instead of leaving it out")
    parser.add_argument("--compound-share", type=float, default=0.0,
                        help="UNet stage: share of captions whose colour, pattern and shape are merged into one "
                             "position (a compound of their embeddings)")
    parser.add_argument("--init", type=Path, help="classifier/clip stage, fresh start: fine-tune this saved model")
    parser.add_argument("--from-export", action="store_true",
                        help="unet stage, fresh start: continue the exported model (assets/toy-sd) instead of "
                             "random weights; the latent scaling factor stays the export's")
    parser.add_argument("--ema", type=float, default=0.999, help="UNet stage: EMA decay of the exported weights")
    parser.add_argument("--out", type=Path, help="export/classifier/clip: output folder (assets/... otherwise)")
    parser.add_argument("--eval-count", type=int, default=2000, help="classifier/clip: held-out images to report on")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--text-init", default="auto",
                        help="unet stage, fresh start: a CLIPModel folder whose text tower initialises the text "
                             "encoder (default: assets/toy-clip if present; 'none': random)")
    args = parser.parse_args(argv)
    if args.text_init == "auto":
        from toyworld.clip import CLIP_PATH

        args.text_init = CLIP_PATH if (CLIP_PATH / "model.safetensors").exists() else None
    args.text_init = None if args.text_init in (None, "none") else Path(args.text_init)
    for key, value in DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "vae":
        train_vae(args)
    elif args.stage == "latents":
        encode_latents(args)
    elif args.stage == "unet":
        train_unet(args)
    elif args.stage == "export":
        from toyworld.model import TOY_SD_PATH

        args.out = args.out or TOY_SD_PATH
        export(args)
    elif args.stage == "compact":
        compact(args)
    elif args.stage == "classifier":
        from toyworld.classifier import train_classifier

        train_classifier(args)
    elif args.stage == "clip":
        from toyworld.clip import train_clip

        train_clip(args)


if __name__ == "__main__":
    main()
