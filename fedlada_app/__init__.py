"""FedLaDa on Flower: a ServerApp and a ClientApp that unpack Flower messages, call ``fedlada``, and pack replies.

The round logic is the library's (``fedlada.runner.drive`` and ``fedlada.host_rounds``, which is ``fedlada.rounds``
plus the host frameworks); this package only moves the library's serialised messages over Flower's Grid. ``records`` owns every record key, ``settings`` the ``flower.*``
run-config knobs, ``client_app``/``server_app`` the two apps, ``simulate`` the in-process simulation entry point,
``loopback`` a TLS-authenticated deployment on 127.0.0.1 (tests, benchmarks, trying it out). See
docs/deployment.md.
"""
