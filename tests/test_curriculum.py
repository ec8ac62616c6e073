"Curriculum: every schedule kind at its endpoints and in between, state round trip, and a side-effect-free plot."
import math
import pytest
from hypothesis import given, settings, strategies as st
from kd_kaggle.config import KDConfig, LOSS_TERMS, default_curriculum, router_curriculum
from kd_kaggle.curriculum import Curriculum, plot_curriculum, schedule_weight

def spec(kind, start=1.0, end=0.0, begin=0.2, until=0.6): return dict(kind=kind, start=start, end=end, begin=begin, until=until)

@pytest.mark.parametrize('kind,expected', [
    # progress:   0    begin  mid(0.4)                       until  1
    ('constant', [1.0, 1.0,   1.0,                            1.0,   1.0]),
    ('linear',   [1.0, 1.0,   0.5,                            0.0,   0.0]),
    ('cosine',   [1.0, 1.0,   0.5,                            0.0,   0.0]),
    ('step',     [1.0, 0.0,   0.0,                            0.0,   0.0]),
])
def test_kinds_at_endpoints(kind, expected):
    got = [schedule_weight(spec(kind), p) for p in (0.0, 0.2, 0.4, 0.6, 1.0)]
    assert got == pytest.approx(expected, abs=1e-12)

def test_cosine_eases_and_linear_does_not():
    assert schedule_weight(spec('linear'), 0.3) == pytest.approx(0.75)
    assert schedule_weight(spec('cosine'), 0.3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule_weight(spec('cosine', start=0.0, end=2.0), 0.5) == pytest.approx(2 - 2 * 0.5 * (1 + math.cos(math.pi * 0.75)))

def test_step_switches_at_begin_and_clamps():
    s = spec('step', start=0.0, end=0.3, begin=0.5)
    assert [schedule_weight(s, p) for p in (0.0, 0.4999, 0.5, 1.0)] == [0.0, 0.0, 0.3, 0.3]
    assert schedule_weight(spec('linear'), -3) == 1.0 and schedule_weight(spec('linear'), 7) == 0.0
    assert schedule_weight(spec('cosine', begin=0.5, until=0.5), 0.5) == 0.0
    with pytest.raises(ValueError, match='finite'): schedule_weight(spec('linear'), float('inf'))
    with pytest.raises(ValueError, match="'kind'"): schedule_weight({'kind': 'exp'}, 0.5)

@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(['linear', 'cosine', 'step', 'constant']), a=st.floats(0, 5), b=st.floats(0, 5),
       p0=st.floats(0, 1), p1=st.floats(0, 1), p=st.floats(-0.5, 1.5), q=st.floats(-0.5, 1.5))
def test_weights_stay_between_start_and_end_and_are_monotone(kind, a, b, p0, p1, p, q):
    s = dict(kind=kind, start=a, end=b, begin=min(p0, p1), until=max(p0, p1))
    w, v = schedule_weight(s, p), schedule_weight(s, q)
    assert min(a, b) - 1e-12 <= w <= max(a, b) + 1e-12
    if kind != 'constant' and p <= q:   # moves from start toward end, never back
        assert (v - w) * (b - a) >= -1e-9

def test_curriculum_weights_active_and_state():
    assert Curriculum(KDConfig().curriculum).active(0.0) == {'ce', 'kd'}   # the default: CE + KD only
    cur = Curriculum(KDConfig(curriculum=router_curriculum()).curriculum)
    assert cur.weights(0.0) == {'ce': 1.0, 'kd': 1.0, 'feat': 0.1, 'layer': 0.05, 'attn': 0.05, 'contr': 0.0}
    assert cur.active(0.0) == {'ce', 'kd', 'feat', 'layer', 'attn'}
    assert cur.active(0.6) == cur.active(1.0) == {'ce', 'kd'}
    assert set(cur.weights()) == set(LOSS_TERMS)
    cur.set_progress(0.45)
    resumed = Curriculum(router_curriculum())
    resumed.load_state_dict(cur.state_dict())
    assert resumed.progress == 0.45 and resumed.weights() == cur.weights()
    with pytest.raises(ValueError, match="'progress'"): resumed.load_state_dict({})
    with pytest.raises(ValueError, match='unknown loss terms'): Curriculum({'distill': 1.0})
    assert Curriculum({'kd': 2.0}).weights(0.5) == {'ce': 0.0, 'kd': 2.0, 'feat': 0.0, 'layer': 0.0, 'attn': 0.0, 'contr': 0.0}

def test_plot_has_no_side_effects():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    plt.close('all')
    fig = plot_curriculum(router_curriculum())
    assert plt.get_fignums() == []                     # not registered with pyplot: nothing to show or leak
    assert sorted(l.get_label() for l in fig.axes[0].lines) == ['attn', 'ce', 'feat', 'kd', 'layer']
    f2, ax = plt.subplots()
    assert plot_curriculum(Curriculum({'kd': 1.0}), ax=ax) is f2 and len(ax.lines) == 1
    plt.close(f2)
