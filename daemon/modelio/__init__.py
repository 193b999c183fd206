"""modelio"""
