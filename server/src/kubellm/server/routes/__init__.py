"""HTTP routers, one module per endpoint family; composed by `kubellm.server.app`."""
