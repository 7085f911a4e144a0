import os
import sys

# The repository root on the path, so `tests.helpers` and the packages import from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The files that take longest (minutes each on 2 cores) go first: the README's command runs
# whole files on two workers (pytest-xdist --dist loadfile), which take them in this order,
# so the long ones start early and both workers finish at about the same time.
LONGEST_FIRST = ("test_bench.py", "test_h100_compile.py", "test_sharding.py",
                 "test_quantization.py", "test_attention_kernels.py", "test_tpu_kernels.py",
                 "test_server.py", "test_paged.py", "test_engine.py", "test_hf_parity.py",
                 "test_tpu_compile.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
