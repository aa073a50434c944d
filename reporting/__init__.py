"""What evaluate.py reports: the metrics, the figures and summary, the review page (its CSS and JS in assets/), and
the published figures they are compared with.
"""
