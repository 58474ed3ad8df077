"""Built-in device profiles (YAML), read by :mod:`ats_deploy.profiles`."""
