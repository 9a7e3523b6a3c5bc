"""The live dashboard's page, script and stylesheet, served by `app.routers.dashboard`."""
