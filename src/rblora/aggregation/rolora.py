"""RoLoRA: alternating rounds, B trained and averaged with A held, then A with B held.

Source: Chen et al., "Robust Federated Finetuning of LLMs via Alternating
Optimization of LoRA" (NeurIPS 2025, arXiv 2502.01755). The clients optimise the two LoRA
factors in turn; in a round only one of them is trained, uploaded and averaged, the other is
the global factor every client received, the same for all (``p_k = n_k / N``,
``Bh_k = s_k B_k``):

    odd round t  (A held at the global A):   Bbar = sum_k p_k Bh_k,  dW_t = Bbar @ A
    even round t (B held at the global Bh):  Abar = sum_k p_k A_k,   dW_t = Bh @ Abar

Each is exact, ``dW_t = sum_k p_k dW_k``, because the held factor is common to every client
(FedIT's ``Bbar @ Abar`` of two averaged factors is not), and a client uploads one factor a
round. B comes first: a fresh LoRA's B is zero, so a round training A alone would not move
(the gradient of A is ``B^T`` times the output gradient). Round 1 holds A at the run's seeded
shared initialisation (:mod:`.frozen`, a client of rank r its first r rows), as FFA-LoRA's;
from round 2 the held factor is the server's global one, sent down with the start.
The authors' code trains B first too: the supplementary code of their OpenReview submission
(read in a third-party copy, we found no repository of theirs) freezes A in its first round and
switches the trained factor once a round.

Heterogeneous ranks (our extension; the paper has one rank): the held factor is a prefix of the
server's, so component j of the trained factor is averaged over the clients that hold it,

    odd:  Bbar[:, j] = sum_{k: r_k > j} n_k Bh_k[:, j] / sum_{k: r_k > j} n_k
    even: Abar[j]    = sum_{k: r_k > j} n_k A_k[j]    / sum_{k: r_k > j} n_k

(RB-LoRA's ``gamma_j(k)``, as FFA-LoRA's): component j multiplies the same held vector for
every holder, so the round's update is the rank-balanced sum of the clients' rank-one
components, with no cross terms; with equal ranks it is the paper's rule. Redistribution:
truncate only, ``A = A_g[:r]``, ``B = B_g[:, :r] / s_r``: svd or merge would replace the held
factor by another basis between two rounds that must share it.

Client-level DP: a round's client term is its trained factor's contribution alone
(``Bh_k diag(g_k)`` in an odd round, ``diag(g_k) A_k`` in an even one) and only that factor is
noised; the held factor is the previous release (:mod:`.privacy`).
"""

from __future__ import annotations

from .types import ClientProtocol, Method, ProtocolCycle, holder_share, weights_from_share

METHOD = Method(
    name="RoLoRA",
    weights=weights_from_share(holder_share),
    share=holder_share,
    form="padded",  # the trained factor: a per-component mean; the held one: held as it is
    default_reduction="truncate",
    reductions=("truncate",),
    exact_mean=True,
    ordered_components=True,
    aliases=("Ro-LoRA",),
    protocol=ProtocolCycle((ClientProtocol(A="held"), ClientProtocol(B="held"))),
    reduction_note="its rounds hold one factor at the last global one; svd or merge would "
    "replace it",
)
