"""mor_client"""
