"""The app's components: the builder is named, not imported, so the per-message ClientApp stays light."""

from fedsmooth_hf.flower import make_client_app, make_server_app

server_app = make_server_app("fedsmooth_flower.task:build_trainer")
client_app = make_client_app("fedsmooth_flower.task:build_trainer")
