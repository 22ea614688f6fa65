"""The teacher side: prompt sources, teachers, judges and the datasets they write."""
