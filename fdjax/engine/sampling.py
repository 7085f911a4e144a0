"""Next-token sampling: greedy, temperature, min-p, top-k and top-p (nucleus), on device."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdjax.ops import checks

# A temperature below this draws greedily: dividing the logits by a smaller one can take
# them past float32's range (a logit of 5 over 1e-38 is +inf, and the draw went to token 0).
# vLLM draws greedily below the same 1e-5.
GREEDY_BELOW = 1e-5


def seed_key(seed: int) -> jax.Array:
  """The PRNG key of an int64 seed, from all its bits, as jax.random.key makes it with x64 on
  (without x64 it keeps the low 32: seeds 5 and 2**32 + 5 drew the same tokens); a seed in
  [0, 2**32) gives jax.random.key(seed)'s key either way."""
  s = int(seed) % 2 ** 64
  return jax.random.wrap_key_data(np.array([s >> 32, s & 0xFFFFFFFF], np.uint32))


class Sampler(NamedTuple):
  """Static sampling settings (hashable, so a jitted loop specialises on them)."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  min_p: float = 0.0

  def validate(self, vocab_size: int) -> "Sampler":
    for name in ("temperature", "min_p") + (("top_p",) if self.top_p is not None else ()):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                            np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= self.temperature < float("inf"):
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k is not None:
      checks.positive_int("sampling", "top_k", self.top_k)
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0.0 <= self.min_p <= 1.0:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    top_k = None if self.top_k is None else min(self.top_k, vocab_size)
    temperature = float(self.temperature) if self.temperature >= GREEDY_BELOW else 0.0
    return Sampler(temperature, top_k, self.top_p, float(self.min_p))


def filter_logits(logits, top_k: int | None, top_p: float | None, min_p: float = 0.0):
  """Sets to -inf every logit under min_p times the likeliest's probability (first, as vLLM
  orders them), outside the top-k and outside the top-p nucleus."""
  if min_p > 0.0:
    floor = jnp.max(logits, axis=-1, keepdims=True) + math.log(min_p)
    logits = jnp.where(logits < floor, -jnp.inf, logits)
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = (before < top_p) | (jnp.arange(logits.shape[-1]) == 0)  # the most likely stays
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def argmax(x):
  """jnp.argmax(x, axis=-1) as int32 (the first largest entry; the first NaN where there is
  one), as a max and then a min over the indices that reach it: two plain reductions. XLA:CPU
  runs jnp.argmax's one reduction over (value, index) pairs far slower: 1.1 against 0.35 ms
  for 16 rows of a 32000-token vocabulary, 144 against 12 us for one row, on this project's
  2-core CPU (jax 0.12)."""
  top = jnp.max(x, axis=-1, keepdims=True)
  hit = (x == top) | jnp.isnan(x)
  v = x.shape[-1]
  return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), jnp.int32(v)), axis=-1)


def sample(logits, key, sampler: Sampler):
  """logits [B, V] float32 -> token ids [B] int32."""
  if sampler.temperature == 0.0:
    return argmax(logits)
  logits = filter_logits(logits / sampler.temperature, sampler.top_k, sampler.top_p,
                         sampler.min_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# The most top tokens a row's logprobs list (OpenAI's top_logprobs bound), and the most
# logit_bias entries a row carries (the arrays have this fixed width: no shape per request).
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
# What a row's logprobs are of (vLLM's --logprobs-mode names; a row holds the index): the
# model's own distribution (raw, vLLM's default and OpenAI's), or the one the token was drawn
# from (processed: after the penalties, logit bias, min_tokens' EOS ban, grammar, temperature,
# top-k and top-p); the logits themselves instead of log-softmax with the *_logits modes.
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")


def logprobs_mode_error(mode) -> str | None:
  """What is wrong with a logprobs mode, or None."""
  return None if mode in LOGPROBS_MODES else (
      f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {mode!r}")


class Settings(NamedTuple):
  """One request's sampling settings, as the host has them."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  seed: int = 0
  presence_penalty: float = 0.0     # minus this for every token already generated
  frequency_penalty: float = 0.0    # minus this times how often it was generated
  repetition_penalty: float = 1.0   # tokens in the prompt or generated: logit / r if > 0, else * r
  logit_bias: tuple = ()            # ((token id, bias), ...) added to the logits
  min_tokens: int = 0               # EOS cannot be drawn before this many tokens
  ignore_eos: bool = False          # EOS does not end the row
  logprobs: bool = False            # the row's logprobs are recorded
  logprobs_mode: str = "raw_logprobs"  # of what (LOGPROBS_MODES)
  min_p: float = 0.0                # tokens under min_p times the likeliest's probability cut


class RowSampling(NamedTuple):
  """Per-row sampling settings, as arrays (a continuous batch mixes requests): temperature
  [B] (0: greedy), top_k [B] int (0: off), top_p [B] (1: off), min_p [B] (0: off), seed [B]
  uint32, then the logit adjustments (penalties, logit_bias as [B, MAX_LOGIT_BIAS] ids (-1:
  none) and values, EOS banned before position min_pos [B]), ignore_eos [B], logprobs [B] and
  logprobs_mode [B] (an index into LOGPROBS_MODES), prompt_len [B] (where a row's generated
  tokens start), and a grammar's bitmask of the tokens each row may take ([B, 1] of all bits
  when no row has one). A row's token at position p is drawn with the key fold_in(key(seed),
  p), so what a request samples does not depend on the batch it ran in."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  seed: jax.Array
  presence: jax.Array
  frequency: jax.Array
  repetition: jax.Array
  bias_ids: jax.Array
  bias: jax.Array
  min_pos: jax.Array
  ignore_eos: jax.Array
  logprobs: jax.Array
  logprobs_mode: jax.Array
  prompt_len: jax.Array
  mask: jax.Array = None  # [B, words] int32: the tokens each row may take (grammar.masks)

  @classmethod
  def of(cls, settings, prompt_lens=None, masks=None) -> "RowSampling":
    """From one Settings (or a tuple of its leading fields) per row, each row's prompt
    length and the bitmasks of the tokens it may take (None: all), as numpy arrays (the
    caller puts them on the device)."""
    rows = [s if isinstance(s, Settings) else Settings(*s) for s in settings]
    n = len(rows)
    lens = np.zeros(n, np.int32) if prompt_lens is None else np.asarray(prompt_lens, np.int32)
    bias_ids = np.full((n, MAX_LOGIT_BIAS), -1, np.int32)
    bias = np.zeros((n, MAX_LOGIT_BIAS), np.float32)
    for i, r in enumerate(rows):
      if len(r.logit_bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias takes up to {MAX_LOGIT_BIAS} entries, got "
                         f"{len(r.logit_bias)}")
      for j, (t, b) in enumerate(r.logit_bias):
        bias_ids[i, j], bias[i, j] = t, b
    f32 = lambda name: np.asarray([getattr(r, name) for r in rows], np.float32)
    temperature = f32("temperature")
    temperature = np.where(temperature < GREEDY_BELOW, np.float32(0), temperature)
    return cls(temperature, np.asarray([r.top_k or 0 for r in rows], np.int32),
               np.asarray([1.0 if r.top_p is None else r.top_p for r in rows], np.float32),
               f32("min_p"), np.asarray([r.seed for r in rows], np.uint32), f32("presence_penalty"),
               f32("frequency_penalty"), f32("repetition_penalty"), bias_ids, bias,
               lens + np.asarray([r.min_tokens for r in rows], np.int32),
               np.asarray([r.ignore_eos for r in rows], bool),
               np.asarray([r.logprobs for r in rows], bool),
               np.asarray([LOGPROBS_MODES.index(r.logprobs_mode) for r in rows], np.int32), lens,
               np.full((n, 1), -1, np.int32) if masks is None else np.asarray(masks, np.int32))


def filter_rows(logits, rows: RowSampling):
  """filter_logits with each row's own temperature, min-p, top-k and top-p (one sort per row).
  min-p first, as vLLM orders them: a token less likely than min_p times the likeliest is
  cut (the ratio of two probabilities, exp of their logits' difference)."""
  v = logits.shape[-1]
  x = logits / jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
  floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(rows.min_p)[:, None]  # -inf at 0: off
  x = jnp.where(x < floor, -jnp.inf, x)
  ordered = -jnp.sort(-x, axis=-1)
  k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, v), v)
  kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
  x = jnp.where(x < kth, -jnp.inf, x)
  ordered = jnp.where(jnp.arange(v)[None, :] < k[:, None], ordered, -jnp.inf)
  probs = jax.nn.softmax(ordered, axis=-1)
  keep = ((jnp.cumsum(probs, axis=-1) - probs < rows.top_p[:, None]) | (rows.top_p[:, None] >= 1)
          | (jnp.arange(v) == 0)[None, :])  # the most likely token stays, even at top_p 0
  threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(x < threshold, -jnp.inf, x)


def sample_rows(logits, rows: RowSampling, positions):
  """logits [B, V] float32 -> token ids [B] int32, row b drawn as rows[b] says for the token
  at positions[b]; an all-greedy batch skips the sort."""
  greedy = argmax(logits)

  def draw(_):
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(rows.seed, positions)
    drawn = jax.vmap(lambda key, x: jax.random.categorical(key, x))(keys,
                                                                      filter_rows(logits, rows))
    return jnp.where(rows.temperature > 0, drawn.astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(rows.temperature > 0), draw, lambda _: greedy, None)


# ------------------------------------------------------- penalties, bias, min_tokens, EOS

class History(NamedTuple):
  """What the penalties read, per row: how often each token was generated so far [B, V]
  int32, and which tokens the prompt holds [B, V] bool."""
  counts: jax.Array
  prompt: jax.Array


def history(tokens, rows: RowSampling, vocab_size: int) -> History:
  """History from each row's tokens so far [B, T] (prompt then generated, -1 past the end)."""
  b, t = tokens.shape
  ids = jnp.where(tokens >= 0, tokens, vocab_size)  # out of range: dropped
  generated = jnp.arange(t)[None, :] >= rows.prompt_len[:, None]
  row = jnp.arange(b)[:, None]
  counts = jnp.zeros((b, vocab_size), jnp.int32).at[
      row, jnp.where(generated, ids, vocab_size)].add(1, mode="drop")
  prompt = jnp.zeros((b, vocab_size), bool).at[
      row, jnp.where(generated, vocab_size, ids)].set(True, mode="drop")
  return History(counts, prompt)


def record(hist: History, tokens, live) -> History:
  """History after each row generated tokens [B] (or [B, T]) where `live` (same shape)."""
  b = tokens.shape[0]
  rows = jnp.arange(b).reshape((b,) + (1,) * (tokens.ndim - 1))
  return hist._replace(counts=hist.counts.at[rows, tokens].add(live.astype(jnp.int32),
                                                               mode="drop"))


def adjust(logits, rows: RowSampling, hist: History, positions, eos):
  """The logits after the repetition, frequency and presence penalties, the logit bias, and
  EOS banned while a row is short of its min_tokens (the token at positions[b]), skipped
  when no row asks for any of them; then every token outside a row's grammar (its bitmask)
  set to -inf."""
  b, v = logits.shape

  def apply(x):
    seen = hist.prompt | (hist.counts > 0)
    r = rows.repetition[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
    x = (x - rows.frequency[:, None] * hist.counts.astype(x.dtype)
         - rows.presence[:, None] * (hist.counts > 0).astype(x.dtype))
    x = x.at[jnp.arange(b)[:, None], jnp.where(rows.bias_ids >= 0, rows.bias_ids, v)].add(
        rows.bias, mode="drop")
    ban = (positions < rows.min_pos)[:, None] & jnp.isin(jnp.arange(v), eos)[None, :]
    return jnp.where(ban, -jnp.inf, x)

  active = (jnp.any(rows.repetition != 1) | jnp.any(rows.frequency != 0)
            | jnp.any(rows.presence != 0) | jnp.any(rows.bias_ids >= 0)
            | jnp.any(positions < rows.min_pos))
  logits = jax.lax.cond(active, apply, lambda x: x, logits)
  if rows.mask is None or rows.mask.shape[1] == 1:  # no grammar (a program without this)
    return logits
  token = jnp.arange(v)
  allowed = (rows.mask[:, token // 32] >> (token % 32)) & 1
  return jnp.where(allowed == 1, logits, -jnp.inf)


# ------------------------------------------------------------------------- logprobs

class Logprobs(NamedTuple):
  """Per row: the chosen token's logprob [B] and the top tokens [B, K] with theirs."""
  chosen: jax.Array
  top_ids: jax.Array
  top: jax.Array


def top_width(vocab_size: int) -> int:
  return min(MAX_TOP_LOGPROBS, vocab_size)


def logprobs(logits, rows: RowSampling, tokens, raw=None) -> Logprobs:
  """Each row's logprobs of `tokens` and its top tokens, of what its logprobs_mode names: raw,
  the model's logits (`raw`, [B, V]); processed, the distribution it drew from: its adjusted
  logits (`logits`), divided by its temperature and filtered by its top-k / top-p when it
  samples, as they are when greedy (temperature 0 is read as 1). Zeros when no row asks
  (nothing computed)."""
  b, v = logits.shape
  k = top_width(v)

  def compute(x, raw):
    processed = rows.logprobs_mode % 2 == 1  # processed_*, else raw_*
    x = jnp.where(processed[:, None], x.astype(jnp.float32), raw.astype(jnp.float32))
    # the sort of filter_rows only for processed rows that sample (raw is the default)
    cut = processed & (rows.temperature > 0)
    x = jax.lax.cond(jnp.any(cut), lambda x: jnp.where(cut[:, None], filter_rows(x, rows), x),
                     lambda x: x, x)
    lp = jnp.where((rows.logprobs_mode >= 2)[:, None], x,  # *_logits as they are
                   jax.nn.log_softmax(x, axis=-1))
    top, top_ids = jax.lax.top_k(lp, k)
    return Logprobs(jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0],
                    top_ids.astype(jnp.int32), top)

  none = lambda x, raw: Logprobs(jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32),
                                 jnp.zeros((b, k), jnp.float32))
  return jax.lax.cond(jnp.any(rows.logprobs), compute, none, logits,
                      logits if raw is None else raw)


def prompt_logprobs(logits, targets) -> Logprobs:
  """The model's own logprobs (no sampling setting applies) of each prompt position's next
  token: logits [B, T, V], targets [B, T] (-1: none, logprob 0)."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  top, top_ids = jax.lax.top_k(lp, top_width(lp.shape[-1]))
  chosen = jnp.take_along_axis(lp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return Logprobs(jnp.where(targets >= 0, chosen, 0.0), top_ids.astype(jnp.int32), top)
