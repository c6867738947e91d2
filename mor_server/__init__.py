"""mor_server"""
