"""Ray Serve deployments, one thin file per role (encoder, point decoder, text mask, selector,
ingress). Added with the serving-graph issue; the core package stays free of ray."""
