"""The TAPE model against a slow, independent float64 reference written from TAPE.md sections 2-3.

The reference reads nothing from tape_pretrain but the parameters (by name) and the config: it loops over
batch rows, tokens and heads, keeps the state as complex numbers Z = c + i s, builds the logit from the
complex form (1/sqrt(D)) sum_f Re[conj(Q_i) K_j conj(Z_i) Z_j], and applies the MLP-side update in the
factored form M_n = W_pd diag(g_n) W_pu, so it shares no code path with the model's fused/collapsed one.
"""

import cmath
import math

import pytest
import torch

from tape_pretrain.models import build_model
from tests.models.test_tape_properties import tiny_config

B, N, H, D, L, FFN, VOCAB = 2, 6, 3, 4, 3, 16, 23
TOL = dict(rtol=1e-9, atol=1e-12)


def random_model(seed=0):
    """Every weight random and non-zero, large enough that attention is far from uniform and the state moves."""
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=VOCAB, hidden_size=H * D, num_layers=L, num_heads=H, ffn_hidden_size=FFN,
                         max_seq_len=16)
    model = build_model(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name == "norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif any(k in name for k in ("post_attention_linear", "pe.")):
                p.normal_(0, 0.5)  # TAPE's update weights (zero/small at init): make both updates large
            elif name == "embed_tokens.weight":
                p.normal_(0, 1)
            else:
                p.normal_(0, 1.5 / math.sqrt(p.shape[1]))
    return model


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt((x * x).mean() + eps)


def silu(x):
    return x / (1 + torch.exp(-x))


def reference(model, P, ids, offset=0, causal=True):
    """TAPE.md sections 2-3 for the parameters P (name -> tensor).

    Returns logits [B, N, V] and, per layer, the state it hands on as [c | s]: [B, H, N, 2F].
    """
    cfg = model.config
    h_, d_ = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    f_, eps, n_layers = d_ // 2, cfg.norm_eps, cfg.num_layers
    theta = [cfg.positional.rope_base ** (-2 * f / d_) for f in range(f_)]
    logits, states = [], [[] for _ in range(cfg.num_layers)]
    for b in range(ids.shape[0]):
        n_tok = ids.shape[1]
        x = [P["embed_tokens.weight"][ids[b, n]] for n in range(n_tok)]
        # Z[h][n]: [F] complex; t_n = n + k, the same for every head.
        Z = [[torch.tensor([cmath.exp(1j * (n + offset) * th) for th in theta], dtype=torch.complex128)
              for n in range(n_tok)] for _ in range(h_)]
        for layer in range(n_layers):
            def p(name, layer=layer):
                return P[f"layers.{layer}.{name}"]

            last = layer == n_layers - 1
            hs = [rms_norm(x[n], p("input_layernorm.weight"), eps) for n in range(n_tok)]
            q = [p("self_attn.q_proj.weight") @ hs[n] for n in range(n_tok)]
            k = [p("self_attn.k_proj.weight") @ hs[n] for n in range(n_tok)]
            v = [p("self_attn.v_proj.weight") @ hs[n] for n in range(n_tok)]
            gamma = p("positional.post_attention_linear.weight").sum(dim=-1)  # gamma_h: row sum, [H]
            heads_out = [[None] * h_ for _ in range(n_tok)]
            Z_new = [[None] * n_tok for _ in range(h_)]
            for h in range(h_):
                def cplx(u, h=h):  # Q_f = q[f] + i q[f+F] within head h
                    u = u[h * d_:(h + 1) * d_]
                    return u[:f_] + 1j * u[f_:]

                for i in range(n_tok):
                    keys = range(i + 1) if causal else range(n_tok)
                    scores = torch.stack([
                        (cplx(q[i]).conj() * cplx(k[j]) * Z[h][i].conj() * Z[h][j]).real.sum() / math.sqrt(d_)
                        for j in keys])
                    a = torch.exp(scores - scores.max())
                    a = a / a.sum()
                    heads_out[i][h] = sum(a[jj] * v[j][h * d_:(h + 1) * d_] for jj, j in enumerate(keys))
                    moved = sum(a[jj] * Z[h][j] for jj, j in enumerate(keys))  # (A Z)_i
                    Z_new[h][i] = Z[h][i] if last else Z[h][i] + gamma[h] * moved
            Z = Z_new
            x = [x[n] + p("self_attn.o_proj.weight") @ torch.cat(heads_out[n]) for n in range(n_tok)]
            for n in range(n_tok):
                h2 = rms_norm(x[n], p("post_attention_layernorm.weight"), eps)
                m = p("mlp.down_proj.weight") @ (silu(p("mlp.gate_proj.weight") @ h2) * (p("mlp.up_proj.weight") @ h2))
                x[n] = x[n] + m
                if last:  # the last layer's state is never read
                    continue
                g = silu(p("positional.pe.x_proj.weight") @ m)  # [I], from the MLP OUTPUT m
                M = p("positional.pe.down_proj.weight") @ torch.diag(g) @ p("positional.pe.up_proj.weight")  # [H, H]
                # c_new[h] = c[h] + sum_h' M[h, h'] c[h'] (and the same for s): row h of M mixes into head h.
                old = [Z[hp][n] for hp in range(h_)]
                for h in range(h_):
                    Z[h][n] = old[h] + sum(M[h, hp] * old[hp] for hp in range(h_))
            states[layer].append(torch.stack([torch.stack([torch.cat((z.real, z.imag)) for z in row]) for row in Z]))
        logits.append(torch.stack([P["lm_head.weight"] @ rms_norm(x[n], P["norm.weight"], eps)
                                   for n in range(len(x))]))
    return torch.stack(logits), [torch.stack(per_row) for per_row in states]


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (B, N))


@pytest.mark.parametrize("offset,causal", [(0, True), (5, True), (0, False)])
def test_logits_equal_reference(ids, offset, causal):
    model = random_model()
    P = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected, _ = reference(model, P, ids, offset=offset, causal=causal)
        actual = model(ids, causal=causal, position_offset=offset)
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("offset", [0, 5])
def test_every_gradient_equals_reference(ids, offset):
    model = random_model()
    torch.manual_seed(2)
    labels = torch.randint(0, VOCAB, (B, N))
    proj = torch.randn(B, N, VOCAB, dtype=torch.float64)

    def loss(logits):  # cross-entropy plus a random projection, so every logit carries gradient
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()) + (proj * logits).sum()

    loss(model(ids, position_offset=offset)).backward()
    P = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    loss(reference(model, P, ids, offset=offset)[0]).backward()
    for name, p in model.named_parameters():
        if P[name].grad is None:  # the last layer's TAPE weights: never read, so no gradient either way
            assert f"layers.{L - 1}.positional." in name, name
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name  # the comparison is not vacuous
        torch.testing.assert_close(p.grad, P[name].grad, rtol=1e-8, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


def test_every_state_equals_reference(ids):
    """The state each layer hands on, the last one included: its update must be skipped, which logits and
    gradients cannot see (the last state is never read and the last layer's TAPE weights are frozen)."""
    model = random_model()
    P = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        _, expected = reference(model, P, ids, offset=3)
        x = model.embed_tokens(ids)
        state = initial = model.positional.initial_state(B, N, ids.device, torch.float64, offset=3)
        for layer, want in zip(model.layers, expected):
            x, state = layer(x, state)
            torch.testing.assert_close(state, want, **TOL)
    assert (expected[0] - initial).abs().max() > 0.5  # the state really moved
