"""Recipes: one ``@package _global_`` YAML per paper setup, composed over ``conf/`` with
``effml train recipe=NAME``. Each says in its header which paper, which table and what scale."""
