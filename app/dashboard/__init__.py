"""The live dashboard's page, script and stylesheet, served by `app.http.routers.dashboard`."""
