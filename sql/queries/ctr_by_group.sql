-- CTR distribution by group and model: count, mean, min, max and the share above 0.5.
-- Films the input check flagged (not a frontal chest film the model can read) are left out.
SELECT group_name, model, COUNT(*) AS n,
       ROUND(CAST(AVG(ctr) AS NUMERIC), 3) AS mean_ctr,
       ROUND(CAST(MIN(ctr) AS NUMERIC), 3) AS min_ctr,
       ROUND(CAST(MAX(ctr) AS NUMERIC), 3) AS max_ctr,
       ROUND(CAST(AVG(CASE WHEN ctr > 0.5 THEN 1.0 ELSE 0.0 END) AS NUMERIC), 3) AS share_ctr_over_0_5
FROM label_results
WHERE ctr IS NOT NULL AND in_statistics = 1
GROUP BY group_name, model
ORDER BY group_name, model;
