"""Training methods: ``registry`` (generic), ``common`` (shared pieces), ``options`` (MethodOptions and the
flat-key translation) and one package per method. Importing this package registers the built-in methods."""

from velora.methods import registry  # noqa: F401  (the registry exists before any method registers)

# one line per built-in method package: its method.py registers the method and its config's options section
from velora.methods.flora import method as _flora  # noqa: F401,E402
from velora.methods.full import method as _full  # noqa: F401,E402
from velora.methods.galore import method as _galore  # noqa: F401,E402
from velora.methods.gradnorm_lorp import method as _gradnorm_lorp  # noqa: F401,E402
from velora.methods.lora import method as _lora  # noqa: F401,E402
